"""lm-evaluation-harness on our models: saved folders, Hub ids, or the in-memory model with blocks gated off.

The harness (``pip install 'hf_blockcbo[eval]'``) is driven through its Python API with an ``HFLM`` wrapped around the
model object, so a gated candidate is scored without a copy. Tasks are either the harness's own names (they download
their datasets, so they need the network) or local multiple-choice files (JSONL), for which a task YAML in the
harness's own format is generated; the same prompt templates serve :func:`hf_blockcbo.evaluation.likelihood.read_multiple_choice`,
so the package's own scorer and the harness score the same items the same way.

Local file formats (one JSON object per line):

- ``{"question", "choices", "labels", "answer"}`` (benchkit: HellaSwag, ARC, ...): the answer is a label or an index;
  a file whose name contains ``arc`` gets the harness's ARC prompt ``Question: …\\nAnswer:``.
- ``{"passage", "question", "answer": "yes" | "no"}`` (BoolQ): the harness's BoolQ prompt, choices no / yes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from ..errors import BlockCBOError


# prompt templates shared with evaluation.read_multiple_choice (Python format strings; {{…}} in the YAML)
TEMPLATES = {
    "plain": "{question}",
    "arc": "Question: {question}\nAnswer:",
    "boolq": "{passage}\nQuestion: {question}?\nAnswer:",
}
LOCAL_SUFFIXES = (".jsonl", ".json")


def require_lm_eval():
    """The `lm_eval` module, or one line that says what to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise BlockCBOError(
            "lm-evaluation-harness is not installed: pip install 'hf_blockcbo[eval]' (or pip install lm-eval)"
        ) from err
    return lm_eval


def file_kind(path: str | Path, first: dict) -> str:
    """Which template a local multiple-choice file uses: boolq, arc or plain."""
    if "passage" in first:
        return "boolq"
    if "choices" not in first:
        raise BlockCBOError(f"{path}: records need 'choices' (or BoolQ's 'passage'); not a multiple-choice file")
    return "arc" if "arc" in Path(path).name.lower() else "plain"


def _first_record(path: Path) -> dict:
    if not path.is_file():
        raise BlockCBOError(f"no task file at {str(path)!r}")
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        break
                    return record
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BlockCBOError(f"{path} is not a JSONL file of multiple-choice records ({err})") from err
    raise BlockCBOError(f"{path} holds no JSON object per line; not a multiple-choice file")


def task_name(path: str | Path) -> str:
    """The harness task name of a local file: its stem, made a safe identifier, with ``_local``."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).stem).strip("_").lower() or "task"
    return f"{stem}_local"


def local_task_yaml(path: str | Path) -> str:
    """A harness task YAML that reads ``path`` with the `json` dataset builder (no network)."""
    path = Path(path).resolve()
    kind = file_kind(path, _first_record(path))
    text = re.sub(r"\{(\w+)\}", r"{{\1}}", TEMPLATES[kind])
    if kind == "boolq":
        choice, target = '["no", "yes"]', "{{['no', 'yes'].index(answer)}}"
    else:
        choice = "choices"
        target = "{{labels.index(answer) if labels and answer in labels else answer | int}}"
    return "\n".join(
        [
            f"task: {task_name(path)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(path))}",
            "output_type: multiple_choice",
            "test_split: test",
            f"doc_to_text: {json.dumps(text)}",
            f"doc_to_choice: {json.dumps(choice) if kind != 'boolq' else choice}",
            f"doc_to_target: {json.dumps(target)}",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def split_tasks(tasks: Sequence[str]) -> tuple[list[str], list[Path]]:
    """(harness task names, local task files) from a mixed list."""
    names, files = [], []
    for task in tasks:
        task = task.strip()
        if not task:
            continue
        if task.endswith(LOCAL_SUFFIXES) or Path(task).is_file():
            files.append(Path(task))
        else:
            names.append(task)
    if not names and not files:
        raise BlockCBOError("no task given; pass harness task names (hellaswag) or local JSONL files")
    return names, files


@contextlib.contextmanager
def task_folder(files: Sequence[Path]) -> Iterator[tuple[str | None, list[str]]]:
    """A temporary folder of generated YAMLs for ``files``: (include path or None, their task names)."""
    if not files:
        yield None, []
        return
    with tempfile.TemporaryDirectory(prefix="hf_blockcbo_tasks_") as folder:
        names = []
        for path in files:
            name = task_name(path)
            if name in names:
                raise BlockCBOError(f"two task files map to the task name {name!r}; rename one of them")
            (Path(folder) / f"{name}.yaml").write_text(local_task_yaml(path), encoding="utf-8")
            names.append(name)
        yield folder, names


def _scores(results: dict) -> dict[str, dict[str, float]]:
    out = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and metric not in ("alias",) and filt in ("none", ""):
                row[metric] = float(value)
        out[task] = row
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    removed: Sequence[int] = (),
    gate: str = "auto",
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Harness scores of ``model`` with ``removed`` blocks gated off: task → {acc, acc_stderr, acc_norm, ...}.

    Args:
        tasks (`Sequence[str]`): harness task names and/or local JSONL files (see the module docstring).
        limit (`int`, *optional*): the first ``limit`` items of each task.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..hessian.gradients import frozen_eval
    from ..surgery.gates import BlockGates

    names, files = split_tasks(tasks)
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise BlockCBOError(f"limit must be a positive integer, got {limit!r}")
    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = next(model.parameters()).device
    with task_folder(files) as (include, local_names), frozen_eval(model), BlockGates(model, gate=gate) as gates:
        if removed:
            gates.set_removed(list(removed))
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), max_length=max_length
        )
        manager = TaskManager(include_path=include) if include else TaskManager()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names + local_names,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    if results is None:
        raise BlockCBOError("the harness returned no result (a non-main process?)")
    return _scores(results)
