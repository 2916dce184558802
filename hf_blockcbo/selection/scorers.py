"""Block scorers in one registry: CBO and the baselines people use today, same data, same output.

Every scorer takes a :class:`ScoringContext` and M and returns ranked :class:`~hf_blockcbo.solvers.Candidate`
lists (blocks to remove, 0-based). Each candidate's ``energy`` is its CBO energy xᵀHx when a Hessian artifact is
known, so every method can be placed on the same energy axis; ``score`` holds the method's own criterion.

- ``cbo``: the K lowest states of min xᵀHx s.t. Σx = M (this package).
- ``bi``: Block Influence (ShortGPT): 1 − cos(h_in, h_out) per block, remove the M lowest.
- ``angular``: angular distance of Gromov et al.: remove the run of M consecutive blocks whose input and output are
  closest, arccos(cos(h_ℓ, h_ℓ+M))/π, averaged over all real tokens.
- ``norm_ratio``: ‖h_out − h_in‖ / ‖h_in‖ per block (Ministral 3), remove the M lowest.
- ``sleb``: SLEB-style greedy: remove the block whose removal raises the calibration loss least, repeat.
- ``swm``: sliding-window merging (Ding et al. 2025): the window of M+1 consecutive blocks with the smallest
  angular distance is merged into its first block, θ = θ_ℓ + Σ_k (θ_k − θ_ℓ), and the other M blocks are removed.
- ``random``: M blocks drawn with the seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..evaluation.likelihood import perplexity
from ..hessian.artifact import HessianArtifact
from ..hessian.gradients import frozen_eval
from ..solvers import Candidate, energy
from ..surgery.architectures import get_layers


ScorerFn = Callable[["ScoringContext", int], list[Candidate]]
_SCORERS: dict[str, ScorerFn] = {}


def register_scorer(name: str) -> Callable[[ScorerFn], ScorerFn]:
    def wrap(fn: ScorerFn) -> ScorerFn:
        _SCORERS[name] = fn
        return fn

    return wrap


def available_scorers() -> list[str]:
    return list(_SCORERS)


@dataclass
class ScoringContext:
    """What scorers need: the model, calibration samples, the Hessian artifact (for CBO) and settings."""

    model: nn.Module
    calibration: CalibrationSet
    artifact: HessianArtifact | None = None
    top_k: int = 20
    seed: int = 0
    batch_size: int = 8
    protected: list[int] = field(default_factory=list)
    sleb_samples: int = 16
    progress: bool = False
    config: object | None = None  # the BlockRemovalConfig: cbo solves exactly the problem `prune` solves
    _stats: dict | None = None
    _sleb_steps: list[tuple[int, float]] = field(default_factory=list)  # greedy picks so far (nested over M)
    _sleb_key: tuple | None = None  # the settings those picks were made under

    @classmethod
    def from_config(
        cls, model, tokenizer, config, artifact=None, progress: bool = False, **overrides
    ) -> ScoringContext:
        """A context whose calibration samples and settings come from a `BlockRemovalConfig`."""
        from ..data import calibration_samples

        calibration = calibration_samples(tokenizer, config)
        settings = dict(
            top_k=config.top_k,
            seed=config.seed,
            batch_size=config.batch_size,
            protected=config.protected,
            config=config,
        )
        return cls(model, calibration, artifact, progress=progress, **{**settings, **overrides})

    @property
    def num_blocks(self) -> int:
        return len(get_layers(self.model))

    def cbo_energy(self, blocks) -> float:
        return energy(self.artifact.H.numpy(), blocks) if self.artifact is not None else float("nan")

    def stats(self) -> dict:
        if self._stats is None:
            self._stats = boundary_statistics(self.model, self.calibration, self.batch_size, self.progress)
        return self._stats

    def candidate(self, blocks, score: float | None = None, rank: int = 0) -> Candidate:
        blocks = tuple(sorted(int(b) for b in blocks))
        return Candidate(rank=rank, blocks=blocks, energy=self.cbo_energy(blocks), score=score)


@torch.no_grad()
def boundary_statistics(
    model: nn.Module, dataset: CalibrationSet, batch_size: int = 8, progress: bool = False
) -> dict:
    """Per-block cosine(h_in, h_out) and norm ratio, and the angular distance between every pair of block boundaries.

    Boundaries b_0..b_N: b_i is the input of block i, b_N the output of the last block; all means are over real tokens.
    """
    layers = get_layers(model)
    n = len(layers)
    captured: dict[int, torch.Tensor] = {}

    def pre_hook(index):
        def hook(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"]).float()

        return hook

    def post_hook(module, args, output):
        captured[n] = (output if isinstance(output, torch.Tensor) else output[0]).float()

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post_hook))
    angular_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    cos_sum = torch.zeros(n, dtype=torch.float64)
    ratio_sum = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    device = next(model.parameters()).device
    try:
        with frozen_eval(model):
            for _, ids, mask in tqdm(list(dataset.batches(batch_size)), desc="block statistics", disable=not progress):
                captured.clear()
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                valid = mask.to(device).bool()
                states = torch.stack([captured[i][valid] for i in range(n + 1)])  # [n+1, T, D]
                unit = torch.nn.functional.normalize(states, dim=-1)
                for i in range(n + 1):
                    cos = (unit[i : i + 1] * unit[i:]).sum(-1).clamp(-1, 1)  # [n+1-i, T]
                    angular_sum[i, i:] += (torch.arccos(cos) / math.pi).sum(-1).double().cpu()
                cos_sum += (unit[:-1] * unit[1:]).sum(-1).sum(-1).double().cpu()
                update = (states[1:] - states[:-1]).norm(dim=-1) / states[:-1].norm(dim=-1).clamp_min(1e-12)
                ratio_sum += update.sum(-1).double().cpu()
                tokens += int(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {
        "block_influence": (1 - cos_sum / tokens).numpy(),
        "norm_ratio": (ratio_sum / tokens).numpy(),
        "angular": (angular_sum / tokens).numpy(),
    }


def _lowest(ctx: ScoringContext, scores: np.ndarray, num_remove: int) -> list[Candidate]:
    order = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in set(ctx.protected)]
    chosen = order[:num_remove]
    return [ctx.candidate(chosen, float(scores[chosen].sum()))]


def _best_window(ctx: ScoringContext, width: int) -> tuple[int, float]:
    angular = ctx.stats()["angular"]
    protected = set(ctx.protected)
    best = None
    for start in range(ctx.num_blocks - width + 1):
        if protected & set(range(start, start + width)):
            continue
        distance = float(angular[start, start + width])
        if best is None or distance < best[1]:
            best = (start, distance)
    if best is None:
        raise BlockCBOError(f"no run of {width} consecutive unprotected blocks exists")
    return best


@register_scorer("cbo")
def score_cbo(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    if ctx.artifact is None:
        raise BlockCBOError("the cbo scorer needs a Hessian artifact; calibrate first")
    from ..config import BlockRemovalConfig
    from .rounds import solve_with_rounds

    config = ctx.config if ctx.config is not None else BlockRemovalConfig()
    config = config.replace(num_remove=num_remove, top_k=ctx.top_k, protected=ctx.protected, seed=ctx.seed)
    return solve_with_rounds(ctx.model, ctx.artifact, config, lambda: ctx.calibration, ctx.progress)[0].candidates


@register_scorer("bi")
def score_block_influence(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    return _lowest(ctx, ctx.stats()["block_influence"], num_remove)


@register_scorer("norm_ratio")
def score_norm_ratio(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    return _lowest(ctx, ctx.stats()["norm_ratio"], num_remove)


@register_scorer("angular")
def score_angular(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    start, distance = _best_window(ctx, num_remove)
    return [ctx.candidate(range(start, start + num_remove), distance)]


@register_scorer("swm")
def score_sliding_window_merge(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    start, distance = _best_window(ctx, num_remove + 1)
    # the window's first block absorbs the others; they are the ones removed
    return [ctx.candidate(range(start + 1, start + num_remove + 1), distance)]


def swm_merge_target(candidate: Candidate) -> int:
    """The block that absorbs a sliding-window merge candidate's blocks."""
    return candidate.blocks[0] - 1


@register_scorer("sleb")
def score_sleb(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    subset = CalibrationSet(
        ctx.calibration.input_ids[: ctx.sleb_samples], ctx.calibration.attention_mask[: ctx.sleb_samples], "sleb"
    )
    # greedy picks are nested (the first M picks for M + 2 are the picks for M): extend the cached sequence
    key = (tuple(sorted(ctx.protected)), ctx.sleb_samples)
    if ctx._sleb_key != key:
        ctx._sleb_key, ctx._sleb_steps = key, []
    steps = ctx._sleb_steps
    for _ in tqdm(range(len(steps), num_remove), desc="SLEB greedy", disable=not ctx.progress):
        removed = [b for b, _ in steps]
        best = None
        for block in range(ctx.num_blocks):
            if block in removed or block in ctx.protected:
                continue
            value = math.log(perplexity(ctx.model, subset, removed + [block], batch_size=ctx.batch_size))
            if best is None or value < best[1]:
                best = (block, value)
        steps.append(best)
    return [ctx.candidate([b for b, _ in steps[:num_remove]], steps[num_remove - 1][1])]


@register_scorer("random")
def score_random(ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    rng = np.random.default_rng(ctx.seed)
    pool = [i for i in range(ctx.num_blocks) if i not in set(ctx.protected)]
    return [ctx.candidate(rng.choice(pool, size=num_remove, replace=False).tolist())]


def score(name: str, ctx: ScoringContext, num_remove: int) -> list[Candidate]:
    """Candidates of scorer ``name`` for removing ``num_remove`` blocks."""
    if name not in _SCORERS:
        raise BlockCBOError(f"unknown method {name!r}; choose one of {', '.join(available_scorers())}")
    if not 0 < num_remove < ctx.num_blocks - len(ctx.protected) + (name != "swm"):
        raise BlockCBOError(f"cannot remove {num_remove} of {ctx.num_blocks} blocks")
    return _SCORERS[name](ctx, num_remove)


@torch.no_grad()
def merge_window(model: nn.Module, target: int, merged: list[int]) -> None:
    """θ_target ← θ_target + Σ_k (θ_k − θ_target) over the ``merged`` blocks (in place; remove them afterwards)."""
    layers = get_layers(model)
    base = {name: p.detach().clone() for name, p in layers[target].named_parameters()}
    for name, param in layers[target].named_parameters():
        delta = sum(dict(layers[k].named_parameters())[name] - base[name] for k in merged)
        param.add_(delta)


def merged_copy(model: nn.Module, candidate: Candidate, remove: bool = True) -> nn.Module:
    """A copy of ``model`` with the sliding-window merge of ``candidate`` applied and (``remove``) its blocks removed."""
    from ..surgery.removal import remove_blocks

    clone = copy.deepcopy(model)
    merge_window(clone, swm_merge_target(candidate), list(candidate.blocks))
    return remove_blocks(clone, candidate.blocks) if remove else clone
