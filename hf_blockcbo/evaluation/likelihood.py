"""Evaluation of a model with some blocks switched off by gates (no copy of the model per candidate).

- :func:`perplexity`: token-weighted perplexity over a :class:`CalibrationSet`-shaped text set.
- :func:`multiple_choice_accuracy`: zero-shot accuracy by comparing the log-likelihood of each choice given the
  question, as lm-eval does (records `{"question", "choices", "answer"}` with letter `labels`, or BoolQ-style
  `{"question", "passage", "answer": "yes"|"no"}`).
- harness scores: :func:`hf_blockcbo.evaluation.harness.evaluate_tasks` (lm-evaluation-harness, same prompts and tokenization).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..hessian.gradients import frozen_eval
from ..surgery.gates import BlockGates


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def summed_nll(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> float:
    """The next-token loss of ``logits`` ``[b, T, V]`` on ``ids``, summed over the ``valid`` ``[b, T-1]`` targets."""
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    ).view(valid.shape)
    return float(token_loss[valid].sum())


@torch.no_grad()
def _nll(model, dataset: CalibrationSet, batch_size: int, progress: bool, desc: str) -> tuple[float, int]:
    total, count = 0.0, 0
    device = _device(model)
    bar = tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress, leave=False)
    for _, ids, mask in dataset.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        total += summed_nll(logits, ids, valid)
        count += int(valid.sum())
        bar.update(ids.shape[0])
    bar.close()
    return total, count


def perplexity(
    model: nn.Module,
    dataset: CalibrationSet,
    removed: Sequence[int] = (),
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = False,
) -> float:
    """Token-weighted perplexity of ``model`` on ``dataset`` with ``removed`` blocks gated off (α = 0)."""
    if len(dataset) == 0:
        raise BlockCBOError("the evaluation set is empty")
    with frozen_eval(model):
        if removed:
            with BlockGates(model, gate=gate) as gates:
                gates.set_removed(removed)
                total, count = _nll(model, dataset, batch_size, progress, "perplexity")
        else:
            total, count = _nll(model, dataset, batch_size, progress, "perplexity")
    if count == 0:
        raise BlockCBOError("the evaluation set has no target token")
    return math.exp(total / count)


# -- multiple choice ----------------------------------------------------------------------------------------------
def read_multiple_choice(path: str | Path, limit: int | None = None) -> list[dict]:
    """`{"context", "choices", "answer_index"}` items from a benchkit-style or BoolQ JSONL file, with the same prompt
    templates as the harness tasks :mod:`hf_blockcbo.evaluation.harness` generates for that file."""
    from .harness import TEMPLATES, file_kind

    items = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        kind = file_kind(path, row)
        if kind == "boolq":
            context = TEMPLATES["boolq"].format(passage=row["passage"], question=row["question"])
            items.append({"context": context, "choices": ["no", "yes"], "answer_index": int(row["answer"] == "yes")})
        elif "choices" in row:
            labels = row.get("labels") or [chr(65 + i) for i in range(len(row["choices"]))]
            answer = row["answer"]
            index = labels.index(answer) if answer in labels else int(answer)
            context = TEMPLATES[kind].format(question=row["question"])
            items.append({"context": context, "choices": row["choices"], "answer_index": index})
        else:
            raise BlockCBOError(f"{path}: a record has neither 'choices' nor 'passage'; not a multiple-choice file")
        if limit and len(items) >= limit:
            break
    return items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids split the way lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, the whole string is encoded once and the context's tokens are cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def _choice_logprob(model, tokenizer, context: str, choice: str, max_len: int) -> float:
    context_ids, choice_ids = encode_pair(tokenizer, context, " " + choice)
    ids = (context_ids + choice_ids)[-(max_len + 1) :]
    n_choice = min(len(choice_ids), len(ids) - 1)
    tensor = torch.tensor([ids[:-1]], device=_device(model))
    logits = model(input_ids=tensor, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:], device=logits.device)
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(picked[-n_choice:].sum())


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer,
    items: list[dict],
    removed: Sequence[int] = (),
    gate: str = "auto",
    max_len: int = 512,
    progress: bool = False,
) -> float:
    """Zero-shot accuracy: the choice with the highest log-likelihood given the context wins."""
    if not items:
        raise BlockCBOError("no multiple-choice items to evaluate")
    correct = 0
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        if removed:
            gates.set_removed(removed)
        for item in tqdm(items, desc="multiple choice", disable=not progress, leave=False):
            scores = [_choice_logprob(model, tokenizer, item["context"], c, max_len) for c in item["choices"]]
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer_index"])
    return correct / len(items)
