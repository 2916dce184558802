"""Evaluation of a model with some blocks switched off by gates (no copy of the model per candidate).

- :func:`perplexity`: token-weighted perplexity over a :class:`CalibrationSet`-shaped text set;
  :func:`window_losses` keeps each sample's loss, for intervals (:func:`paired_ratio_interval`).
- :func:`multiple_choice_accuracy`: zero-shot accuracy by comparing the log-likelihood of each choice given the
  question, as lm-eval does (records `{"question", "choices", "answer"}` with letter `labels`, or BoolQ-style
  `{"question", "passage", "answer": "yes"|"no"}`).
- harness scores: :func:`hf_blockcbo.evaluation.harness.evaluate_tasks` (lm-evaluation-harness, same prompts and tokenization).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
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


def row_nll(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The next-token loss of ``logits`` ``[b, T, V]`` on ``ids``, summed per row over the ``valid`` ``[b, T-1]``
    targets (float64 ``[b]``)."""
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    ).view(valid.shape)
    return token_loss.masked_fill(~valid, 0.0).double().sum(1)


def summed_nll(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> float:
    """The next-token loss of ``logits`` ``[b, T, V]`` on ``ids``, summed over the ``valid`` ``[b, T-1]`` targets."""
    return float(row_nll(logits, ids, valid).sum())


@dataclass
class WindowLosses:
    """Each sample's summed next-token loss and its number of targets, on one set, for one model and removal."""

    nll: list[float]
    tokens: list[int]

    @property
    def perplexity(self) -> float:
        count = sum(self.tokens)
        if count == 0:
            raise BlockCBOError("the evaluation set has no target token")
        return math.exp(sum(self.nll) / count)


@torch.no_grad()
def _window_nll(model, dataset: CalibrationSet, batch_size: int, progress: bool, desc: str) -> WindowLosses:
    losses = WindowLosses([], [])
    device = _device(model)
    bar = tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress, leave=False)
    for _, ids, mask in dataset.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        losses.nll += row_nll(logits, ids, valid).tolist()
        losses.tokens += valid.sum(1).tolist()
        bar.update(ids.shape[0])
    bar.close()
    return losses


def window_losses(
    model: nn.Module,
    dataset: CalibrationSet,
    removed: Sequence[int] = (),
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = False,
) -> WindowLosses:
    """Each sample's summed next-token loss of ``model`` on ``dataset`` with ``removed`` blocks gated off (α = 0)."""
    if len(dataset) == 0:
        raise BlockCBOError("the evaluation set is empty")
    with frozen_eval(model), BlockGates(model, gate=gate) if removed else contextlib.nullcontext() as gates:
        if removed:
            gates.set_removed(removed)
        return _window_nll(model, dataset, batch_size, progress, "perplexity")


def perplexity(
    model: nn.Module,
    dataset: CalibrationSet,
    removed: Sequence[int] = (),
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = False,
) -> float:
    """Token-weighted perplexity of ``model`` on ``dataset`` with ``removed`` blocks gated off (α = 0)."""
    return window_losses(model, dataset, removed, batch_size, gate, progress).perplexity


def paired_ratio_interval(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    tokens: Sequence[int],
    draws: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Perplexity ratio a / b on the same samples and its paired-bootstrap interval: the samples are resampled with
    replacement, the same draw for both, ``draws`` times; returns ``(ratio, low, high)``.

    Args:
        nll_a, nll_b (`Sequence[float]`): each sample's summed next-token loss (`WindowLosses.nll`) under a and b.
        tokens (`Sequence[int]`): each sample's number of targets (the same for both).
        level (`float`, *optional*, defaults to 0.95): the interval's coverage.
    """
    a = torch.as_tensor(nll_a, dtype=torch.float64)
    b = torch.as_tensor(nll_b, dtype=torch.float64)
    w = torch.as_tensor(tokens, dtype=torch.float64)
    if not a.shape == b.shape == w.shape or a.numel() == 0:
        raise BlockCBOError(f"paired samples must match: {a.numel()}, {b.numel()} losses and {w.numel()} counts")
    if not 0 < level < 1:
        raise BlockCBOError(f"level must lie between 0 and 1, got {level!r}")
    ratio = math.exp(float((a - b).sum() / w.sum()))
    idx = torch.randint(0, a.numel(), (draws, a.numel()), generator=torch.Generator().manual_seed(seed))
    diff = (a - b)[idx].sum(1) / w[idx].sum(1).clamp_min(1.0)
    tail = (1 - level) / 2
    low, high = torch.quantile(diff, torch.tensor([tail, 1 - tail], dtype=torch.float64)).exp().tolist()
    return ratio, low, high


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
