"""Repair without training: a least-squares map per removed run of blocks, folded into an existing weight.

For a run of removed blocks ``[start, stop)`` let ``u`` be the last additive contribution to the residual stream
before the gap (the output of block ``start − 1``'s last branch, or the token embeddings when ``start = 0``), ``h``
the stream after the gap in the pruned model and ``g`` the unpruned model's stream at the same place. Removal leaves
``h = b + u`` with ``b = h − u``; the repair replaces ``u`` by ``u·T`` with

    T = argmin Σ_tokens ‖g − b − u·T‖² + λ‖T − I‖²  =  (UᵀU + λI)⁻¹ (Uᵀ(G − B) + λI)     (ridge least squares)

accumulated in float64 over calibration tokens in one pass per run (λ = ``ridge`` × the mean of diag(UᵀU)). The
ridge shrinks T towards the identity, i.e. towards the unrepaired model, not towards zero. ``weighting =
"uniform"`` (the default) is that plain sum. ``"relative"`` divides each token's squared error by its target's mean
square, ‖g‖²/d, so the fit minimises the mean *relative* error per token (the next block reads the stream through an
RMS norm; the attention sink at position 0 holds 99 % of Σ‖g‖² on SmolLM2). Measured, it helps where a gap's source
block writes massive activations (SmolLM2, a gap at block 3) and hurts where the model relies on the sink's exact
stream (Gemma-3-270M): docs/results.md §3. Runs are
fitted in order, each on the model with the earlier runs removed and repaired. Because ``u`` is the output of a linear
layer, ``u·T`` folds into that layer (``W ← TᵀW``, ``b ← b·T``): the checkpoint keeps its architecture and loads in
plain transformers. Families whose branch ends in an RMS norm (Gemma 2/3: ``u = x̂(y)·γ``) cannot take ``u·T`` as it
is, since nothing linear follows the norm. Their map is ``u ↦ x̂(y·A)·s`` with ``A`` any d×d matrix folded into the
projection before the norm and ``s`` into the norm's weight (``renormalised``, the default): the ridge solution T is
fitted first, as above, and ``(A, s)`` are then fitted to reproduce its outputs ``u·T`` token by token, the norm in
the loss (L-BFGS on the cached activations, started from A = diag(γ)·T). On Gemma-3-270M this keeps nearly all of
the linear map's fit (stream error 0.026 against 0.024) where a scale per channel (``diagonal``, 0.244) or an
orthogonal map (``rotation``: ``x̂(y·R) = x̂(y)·R``) keep little: docs/results.md §3. This is the idea of ReplaceMe
(arXiv 2505.02819) and LinearPatch (arXiv 2505.24680), extended to any set of removed blocks. With ``depth``
(`repair_depth`), the output projections of the first kept blocks after each gap are refitted too: repair/refit.py.
This module accumulates the normal equations and orders the fits; the map forms are solved in repair/forms.py,
folded in repair/fold.py, and the activations captured by repair/capture.py.

```python
repair = fit_repair(model, removed=[10, 11, 20], calibration=samples)
with repair.applied(model):          # hooks: the gated model as if repaired (no copy)
    ...
repair.fold_into(model)              # weights rewritten; then remove_blocks(model, [10, 11, 20])
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import REPAIR_KINDS, RepairSettings
from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..hessian.gradients import frozen_eval
from ..surgery.architectures import ArchitectureSpec, get_architecture, get_layers
from ..surgery.gates import BlockGates
from .capture import capture_contribution, capture_streams
from .fold import BEFORE_THE_NORM, contribution_module, dense_projection, fold_map, norm_eps
from .forms import (
    NormalEquations,
    RepairMap,
    rms_normalise,
    solve_map,
    solve_renormalised,
    solve_rotation,
    token_weights,
)
from .refit import Refit, projection_inputs, refit_blocks, solve_refit


# -- where a block's last contribution comes from ------------------------------------------------------------------
def removed_runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks as ``(start, stop)`` pairs, in order."""
    runs: list[tuple[int, int]] = []
    for block in sorted(set(int(b) for b in removed)):
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


def _embeddings_tied(model: nn.Module) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and inputs is not None and outputs.weight is inputs.weight


def check_repairable(
    model: nn.Module,
    removed: Sequence[int],
    spec: ArchitectureSpec | None = None,
    settings: RepairSettings | None = None,
) -> str:
    """The repair kind for ``model`` (the family's, or ``settings.kind`` where it folds there), or one clear error;
    runs no forward pass. An explicit ``settings.depth > 0`` (refits after each gap) needs a dense output projection
    in each refitted block; unset, the refits go where there is one."""
    settings = settings or RepairSettings()
    spec, kind = spec or get_architecture(model), settings.kind
    if kind not in (None, "auto") and kind != spec.repair:
        folds = ("linear",) if spec.repair == "linear" else ("diagonal", *BEFORE_THE_NORM)
        if spec.repair not in REPAIR_KINDS or kind not in folds:
            raise BlockCBOError(
                f"a {kind!r} repair map does not fold into the {spec.name!r} architecture; it takes "
                f"{', '.join(folds) if spec.repair in REPAIR_KINDS else 'none'}"
            )
        spec = dataclasses.replace(spec, repair=kind)
    if spec.repair not in REPAIR_KINDS or not spec.branches:
        raise BlockCBOError(
            f"the {spec.name!r} architecture does not say where a block's last residual contribution is, so a repair "
            "map cannot be folded into it; do without the repair (`repair=false`) or register the family's branches"
        )
    runs = removed_runs(removed)
    if runs and runs[0][0] == 0 and _embeddings_tied(model):
        raise BlockCBOError(
            "block 0 is removed and the token embeddings are tied to the LM head, so the repair map cannot be folded "
            "into the embeddings without changing the output layer; protect block 0 (`protected`) or do without the "
            "repair (`repair=false`)"
        )
    _refitted_blocks(model, runs, spec, spec.repair, settings.depth)  # an explicit depth that cannot fold: refused
    return spec.repair


def _refitted_blocks(model, runs, spec: ArchitectureSpec, kind: str, depth: int | None) -> tuple[list[list[int]], int]:
    """The blocks refitted after each run and the depth used. Unset ``depth``: 1 over the blocks whose last branch
    ends in a dense projection (none behind a post-norm). An explicit depth: every block it names, or one clear
    error where one has no dense projection to refit."""
    if depth is None:
        depth, strict = (1 if kind == "linear" else 0), False
    elif depth and kind != "linear":
        raise BlockCBOError(
            f"`repair_depth` refits a kept block's output projection, but the {spec.name!r} architecture passes each "
            f"branch's output through a norm after it (its repair map is {kind!r}), so no refit folds; set "
            "`repair_depth=0`"
        )
    else:
        strict = True
    num_blocks = len(get_layers(model, spec))
    refitted = []
    for j in range(len(runs)):
        kept = []
        for block in refit_blocks(runs, j, depth, num_blocks):
            branch = contribution_module(model, block, spec)
            if dense_projection(branch) is not None:
                kept.append(block)
            elif strict:
                raise BlockCBOError(
                    f"`repair_depth` refits a kept block's output projection, but block {block}'s last branch "
                    f"({type(branch).__name__}) ends in none (experts or a norm); set `repair_depth=0`"
                )
        refitted.append(kept)
    return refitted, depth if strict or any(refitted) else 0


def _projection(model: nn.Module, block: int, spec: ArchitectureSpec | None = None) -> nn.Module:
    """The dense output projection of block ``block``'s last branch (checked by `check_repairable`)."""
    projection = dense_projection(contribution_module(model, block, spec))
    if projection is None:
        raise BlockCBOError(f"block {block} has no dense output projection to refit; set `repair_depth=0`")
    return projection


def kind_before_training(model: nn.Module, kind: str | None) -> str:
    """The map form to fit when training follows the repair (`prune --heal`, the callback's `remove_at_step`):
    ``"auto"`` becomes the family's `repair_before_training` where it names one (Gemma: ``diagonal``, the better start
    for distillation in docs/results.md §3); any other ``kind`` is the user's choice and is kept."""
    if kind not in (None, "auto"):
        return kind
    return get_architecture(model).repair_before_training or "auto"


# -- the fitted maps -----------------------------------------------------------------------------------------------
@dataclass
class Repair:
    """Every run's map, fitted in order, and how they were fitted."""

    removed: list[int]
    kind: str
    ridge: float
    tokens: int
    maps: list[RepairMap] = field(default_factory=list)
    seconds: float = 0.0
    weighting: str = "uniform"
    depth: int = 0
    refits: list[Refit] = field(default_factory=list)  # repair_depth: kept blocks' output projections, in order
    data: str = ""  # where the calibration tokens came from (`CalibrationSet.source`)

    def to_dict(self) -> dict:
        out = {
            "kind": self.kind,
            "ridge": self.ridge,
            "weighting": self.weighting,
            "tokens": self.tokens,
            "data": self.data,
            "seconds": round(self.seconds, 3),
            "runs": [m.to_dict() for m in self.maps],
        }
        if self.depth:
            out.update(depth=self.depth, refits=[r.to_dict() for r in self.refits])
        return out

    @contextlib.contextmanager
    def applied(self, model: nn.Module, spec: ArchitectureSpec | None = None) -> Iterator[None]:
        """Hooks that map each source contribution by its ``T`` and add each refit's correction, for the duration
        (the model's weights untouched)."""
        # refits first: where a refitted projection is itself a gap's source module (OPT's fc2), the map must see
        # the refitted output, as it did when it was fitted (forward hooks run in the order they are registered)
        handles = [r.attach(_projection(model, r.block, spec)) for r in self.refits]
        handles += [_attach_map(model, m, spec) for m in self.maps]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def fold_into(self, model: nn.Module, spec: ArchitectureSpec | None = None) -> None:
        """Rewrite the weights so the model computes what `applied` does without hooks; all or nothing. Refits go
        first: a refitted projection may be the source of a later gap's map, which was fitted on top of it."""
        spec = spec or get_architecture(model)
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            for r in self.refits:
                r.fold(_projection(model, r.block, spec))
            for m in self.maps:
                fold_map(model, m, spec)
        except BaseException:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(saved[name])
            raise


def _apply(tensor: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.to(device=tensor.device, dtype=tensor.dtype)
    return tensor * matrix if matrix.dim() == 1 else tensor @ matrix


def _attach_map(model: nn.Module, repair_map: RepairMap, spec: ArchitectureSpec | None):
    module = contribution_module(model, repair_map.source, spec)
    if repair_map.kind in BEFORE_THE_NORM:  # the post-norm recomputed: x̂(y·A)·s (rotation: x̂(yR) = x̂(y)R)
        eps = norm_eps(module)

        def renormalised(mod, args, output):
            y = args[0]
            z = rms_normalise(y.float() @ repair_map.matrix.to(y.device, torch.float32), eps)
            return (z * repair_map.scale.to(y.device, torch.float32)).type_as(y)

        return module.register_forward_hook(renormalised)

    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            return _apply(output, repair_map.matrix)
        return (_apply(output[0], repair_map.matrix),) + tuple(output[1:])

    return module.register_forward_hook(hook)


# -- fitting -------------------------------------------------------------------------------------------------------
def _fit_refit(model, layers, spec, repair: Repair, block: int, targets, calibration, batch_size, gate) -> Refit:
    """The refit of block ``block``'s output projection on the model with ``repair`` (so far) applied."""
    device = next(model.parameters()).device
    projection = _projection(model, block, spec)
    hidden = targets[0].shape[-1]
    normal: NormalEquations | None = None
    with repair.applied(model, spec), BlockGates(model, gate=gate, spec=spec) as gates:
        gates.set_removed(repair.removed)
        for b, (_, ids, mask) in enumerate(calibration.batches(batch_size)):
            keep = mask.reshape(-1).bool().to(device)
            _, h, x = capture_contribution(model, layers, projection, block, ids.to(device), mask.to(device))
            g = targets[b].double()
            x = x.reshape(-1, x.shape[-1])[keep].double().cpu()
            e = g - h.reshape(-1, hidden)[keep].double().cpu()
            if not (torch.isfinite(x).all() and torch.isfinite(e).all()):
                raise BlockCBOError(
                    f"the activations of block {block} are not finite (NaN or inf); load the model in float32 "
                    "(`dtype`) or check the weights"
                )
            normal = normal or NormalEquations.zeros(x.shape[-1], hidden)
            normal.add(x, e, g, token_weights(g, repair.weighting))
    return solve_refit(normal, block, repair.ridge)


def fit_repair(
    model: nn.Module,
    removed: Sequence[int],
    calibration: CalibrationSet,
    settings: RepairSettings | None = None,
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = False,
) -> Repair:
    """Fit one map per removed run (see the module docstring); the model is left exactly as it was.

    Args:
        model (`nn.Module`): the unpruned causal LM (blocks are switched off with gates while fitting).
        removed (`Sequence[int]`): the blocks that will be removed.
        calibration (`CalibrationSet`): the tokens the maps are fitted on; at least the hidden size of them.
        settings (`RepairSettings`, *optional*): ridge, token weighting, the map's form and the depth of refits
            after each gap (defaults: ridge 0.3, uniform, the family's form, and one refit where the block ends in
            a dense projection); `BlockRemovalConfig.repair_settings` gives a run's.
    """
    began = time.perf_counter()
    settings = settings or RepairSettings()
    ridge, weighting = settings.ridge, settings.weighting
    spec = get_architecture(model)
    kind = check_repairable(model, removed, spec, settings)
    hidden = model.get_input_embeddings().weight.shape[-1]
    valid_tokens = int(calibration.attention_mask.sum()) if len(calibration) else 0
    if valid_tokens < hidden:
        raise BlockCBOError(
            f"repair fits a {hidden}×{hidden} map per run and needs at least {hidden} calibration tokens, got "
            f"{valid_tokens}; raise `repair_samples` or `seq_len`"
        )
    layers = get_layers(model, spec)
    runs = removed_runs(removed)
    refitted, depth = _refitted_blocks(model, runs, spec, kind, settings.depth)
    widest = max((projection_inputs(_projection(model, b, spec)) for bs in refitted for b in bs), default=0)
    if valid_tokens < widest:
        raise BlockCBOError(
            f"`repair_depth` refits output projections with {widest} inputs and needs at least {widest} calibration "
            f"tokens, got {valid_tokens}; raise `repair_samples` or `seq_len`, or lower `repair_depth`"
        )
    device = next(model.parameters()).device
    repair = Repair(
        removed=sorted(set(int(b) for b in removed)),
        kind=kind,
        ridge=ridge,
        tokens=valid_tokens,
        weighting=weighting,
        depth=depth,
        data=calibration.source,
    )
    passes = len(runs) + 1 + sum(len(r) for r in refitted)
    bar = tqdm(total=passes * len(calibration), desc="fitting repair maps", disable=not progress, leave=False)
    with frozen_eval(model), torch.no_grad():
        # the unpruned stream after every gap (and every refitted block), one pass (float32 on the CPU, valid tokens)
        after = sorted({stop - 1 for _, stop in runs} | {b for blocks in refitted for b in blocks})
        streams_of: dict[int, list[torch.Tensor]] = {i: [] for i in after}
        for _, ids, mask in calibration.batches(batch_size):
            streams = capture_streams(model, layers, after, ids.to(device), mask.to(device))
            keep = mask.reshape(-1).bool()
            for i in after:
                streams_of[i].append(streams[i].reshape(-1, hidden)[keep.to(device)].float().cpu())
            bar.update(ids.shape[0])
        targets = [streams_of[stop - 1] for _, stop in runs]
        for j, (start, stop) in enumerate(runs):
            source = start - 1
            module = contribution_module(model, source, spec)
            run_kind = kind if source >= 0 else "linear"  # a gap at block 0 maps the (untied) embeddings
            normal = NormalEquations.zeros(hidden, hidden)
            cached: dict[str, list[torch.Tensor]] = {"y": [], "r": [], "w": []}  # renormalised: the rows themselves
            with repair.applied(model, spec), BlockGates(model, gate=gate, spec=spec) as gates:
                gates.set_removed(repair.removed)
                for b, (_, ids, mask) in enumerate(calibration.batches(batch_size)):
                    keep = mask.reshape(-1).bool().to(device)
                    u, h, y = capture_contribution(model, layers, module, stop - 1, ids.to(device), mask.to(device))
                    g = targets[j][b].double()
                    u = u.reshape(-1, hidden)[keep].double().cpu()
                    r = g - (h.reshape(-1, hidden)[keep].double().cpu() - u)
                    if run_kind == "rotation":  # regress on the normalised input of the post-norm instead
                        u = rms_normalise(y, norm_eps(module)).reshape(-1, hidden)[keep].double().cpu()
                    if not (torch.isfinite(u).all() and torch.isfinite(r).all()):
                        raise BlockCBOError(
                            f"the activations around removed blocks {start}..{stop - 1} are not finite (NaN or "
                            "inf); load the model in float32 (`dtype`) or check the weights"
                        )
                    w = token_weights(g, weighting)
                    if run_kind == "renormalised":
                        cached["y"].append(y.reshape(-1, hidden)[keep].float().cpu())
                        cached["r"].append(r.float())
                        cached["w"].append(w.float())
                    normal.add(u, r, g, w)
                    bar.update(ids.shape[0])
            targets[j] = streams_of[stop - 1] = []  # freed: the refits only need their own blocks' streams
            scale = None
            if run_kind in BEFORE_THE_NORM:  # the post-norm's own scale γ: where the fit starts
                gamma = module.weight.detach().double().cpu() + spec.norm_weight_offset
            if run_kind == "rotation":
                matrix, scale, before, after = solve_rotation(normal, gamma, ridge)
            elif run_kind == "renormalised":
                rows = [torch.cat(cached[key]) for key in ("y", "r", "w")]
                matrix, scale, before, after = solve_renormalised(normal, *rows, gamma, norm_eps(module), ridge)
            else:
                matrix, before, after = solve_map(normal, run_kind, ridge)
            total = max(normal.gg, 1e-30)
            repair.maps.append(
                RepairMap(start, stop, source, matrix, before / total, max(after, 0.0) / total, run_kind, scale)
            )
            for block in refitted[j]:
                repair.refits.append(
                    _fit_refit(
                        model, layers, spec, repair, block, streams_of.pop(block), calibration, batch_size, gate
                    )
                )
                bar.update(len(calibration))
    bar.close()
    repair.seconds = time.perf_counter() - began
    return repair


def repair_aware(
    model: nn.Module, data: CalibrationSet, settings: RepairSettings, batch_size: int = 8, gate: str = "auto"
):
    """For repair-aware selection: ``candidate -> factory of contexts`` in which the gated model carries that
    candidate's repair (fitted on ``data`` when called, so a candidate that cannot be repaired is refused before
    scoring; the factory can be entered once per batch)."""

    def prepare(candidate):
        fitted = fit_repair(model, candidate.blocks, data, settings, batch_size, gate)
        return functools.partial(fitted.applied, model)

    return prepare
