"""Perplexity of many removal states on one text set, the blocks a group of states shares computed once.

The stream entering block k depends only on which blocks before k are removed, so states that agree on blocks
``0..k−1`` share it. The states form a trie over the blocks: each stretch on which a group of states agrees is run
once per batch, from the stream where the group split off, and a removed block is skipped rather than run with its
gate at 0 (its output is its input). For the top-K states of one M, which mostly agree on their first blocks, this
runs far fewer blocks than K separate gated forwards, and gives the same perplexities: the replay and the skip are
checked against a full forward once per model (:func:`hf_blockcbo.hessian.measured.fast_paths`); a model that fails
the check is evaluated one state at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..hessian.gradients import frozen_eval
from ..hessian.measured import fast_paths
from ..hessian.replay import output_is_tuple, shared_prefix, skipped_blocks, stream_until
from ..surgery.gates import BlockGates
from .likelihood import perplexity, summed_nll


def perplexities(
    model: nn.Module,
    dataset: CalibrationSet,
    states: Sequence[Sequence[int]],
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = False,
    desc: str = "validating candidates",
) -> list[float]:
    """Token-weighted perplexity of ``model`` on ``dataset`` with each state's blocks removed, in the order of
    ``states``; equal to :func:`hf_blockcbo.evaluation.likelihood.perplexity` of each state."""
    if len(dataset) == 0:
        raise BlockCBOError("the evaluation set is empty")
    sets = [frozenset(int(b) for b in state) for state in states]
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        layers, num_blocks = gates.layers, gates.num_blocks
        share = fast_paths(model, gates, dataset, chunked_head=False).share_prefix
    if not share or len(sets) < 2:
        return [perplexity(model, dataset, sorted(s), batch_size, gate) for s in sets]
    outside = sorted({b for s in sets for b in s if not 0 <= b < num_blocks})
    if outside:
        raise BlockCBOError(f"blocks {outside} do not exist: the model has {num_blocks} (0..{num_blocks - 1})")
    device = next(model.parameters()).device
    totals = [0.0] * len(sets)
    count = 0
    bar = tqdm(total=len(dataset) * len(sets), desc=desc, unit="state·sample", disable=not progress, leave=False)
    with frozen_eval(model), torch.no_grad():
        as_tuple = None
        for _, ids, mask in dataset.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            if as_tuple is None:
                as_tuple = output_is_tuple(layers, model, ids, mask)
            walk = _BatchWalk(model, layers, sets, ids, mask, as_tuple)
            walk.group(list(range(len(sets))), (0, None))
            for c, nll in walk.nll.items():
                totals[c] += nll
            count += int(walk.valid.sum())
            bar.update(len(sets) * ids.shape[0])
    bar.close()
    if count == 0:
        raise BlockCBOError("the evaluation set has no target token")
    return [math.exp(total / count) for total in totals]


class _BatchWalk:
    """One batch through the trie of ``sets``: ``nll[c]``, the summed next-token loss of state ``c``."""

    def __init__(self, model, layers, sets, ids, mask, as_tuple: bool):
        self.model, self.layers, self.sets, self.as_tuple = model, layers, sets, as_tuple
        self.ids, self.mask = ids, mask
        self.valid = (mask[:, 1:] * mask[:, :-1]).bool()
        self.nll: dict[int, float] = {}

    def group(self, members: list[int], start: tuple[int, torch.Tensor | None]) -> None:
        """States ``members`` agree on every block before ``start[0]``, whose input is ``start[1]`` (None: block 0)."""
        k = start[0]
        while k < len(self.layers) and len({k in self.sets[c] for c in members}) == 1:
            k += 1
        if k == len(self.layers):  # one state (or duplicates): run it to the end
            self.leaf(members, start)
            return
        if k > start[0]:  # the stretch the whole group agrees on, run once
            hidden = stream_until(
                self.model, self.layers, self.ids, self.mask, k, start, self.sets[members[0]], self.as_tuple
            )
            start = (k, hidden)
        self.group([c for c in members if k in self.sets[c]], start)
        self.group([c for c in members if k not in self.sets[c]], start)

    def leaf(self, members: list[int], start: tuple[int, torch.Tensor | None]) -> None:
        first, hidden = start
        skip = [b for b in self.sets[members[0]] if b >= first]
        with (
            shared_prefix(self.layers, first, hidden, self.as_tuple),
            skipped_blocks(self.layers, skip, self.as_tuple),
        ):
            logits = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        nll = summed_nll(logits, self.ids, self.valid)
        for c in members:
            self.nll[c] = nll
