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
from .refit import Refit, RefitNormal, dense_projection, projection_inputs, refit_blocks


_BEFORE_THE_NORM = ("rotation", "renormalised")  # a map folded before a post-norm, plus the norm's scale
_OUTPUT_PROJECTIONS = ("down_proj", "dense_4h_to_h", "c_proj", "out_proj", "o_proj", "fc2")
_SHARED_EXPERTS = ("shared_expert", "shared_experts")


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
        folds = ("linear",) if spec.repair == "linear" else ("diagonal", *_BEFORE_THE_NORM)
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
            if dense_projection(branch, _OUTPUT_PROJECTIONS) is not None:
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
    projection = dense_projection(contribution_module(model, block, spec), _OUTPUT_PROJECTIONS)
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


def contribution_module(model: nn.Module, source: int, spec: ArchitectureSpec | None = None) -> nn.Module:
    """The module whose output is the last addition to the stream by block ``source`` (−1: the token embeddings)."""
    spec = spec or get_architecture(model)
    if source < 0:
        return model.get_input_embeddings()
    block = get_layers(model, spec)[source]
    for name in reversed(spec.branches):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise BlockCBOError(f"block {source} ({type(block).__name__}) has none of the branches {spec.branches}")


# -- the fitted maps -----------------------------------------------------------------------------------------------
@dataclass
class RepairMap:
    """The map of one removed run: ``u ↦ u·T`` on the contribution of block ``source`` (−1: embeddings).

    ``error_before`` / ``error_after``: Σ w‖g − h‖² / Σ w‖g‖² over the calibration tokens, unrepaired and repaired
    (``relative`` weighting: the mean over tokens of ‖g − h‖² / ‖g‖²).
    """

    start: int
    stop: int
    source: int
    matrix: torch.Tensor  # [d, d] (linear, rotation) or [d] (diagonal), float64
    error_before: float
    error_after: float
    kind: str = "linear"
    scale: torch.Tensor | None = None  # rotation: the new post-norm scale s (the norm computes x̂·s)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "removed": list(range(self.start, self.stop)),
            "mapped_into": "embeddings" if self.source < 0 else f"block {self.source}",
            "fit_error_before": self.error_before,
            "fit_error_after": self.error_after,
        }


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

    def to_dict(self) -> dict:
        out = {
            "kind": self.kind,
            "ridge": self.ridge,
            "weighting": self.weighting,
            "tokens": self.tokens,
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
                _fold(model, m, spec)
        except BaseException:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(saved[name])
            raise


def _apply(tensor: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.to(device=tensor.device, dtype=tensor.dtype)
    return tensor * matrix if matrix.dim() == 1 else tensor @ matrix


def _norm_eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if isinstance(getattr(module, name, None), float):
            return getattr(module, name)
    raise BlockCBOError(f"{type(module).__name__} keeps no eps; a rotation repair needs an RMS norm")


def _rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _attach_map(model: nn.Module, repair_map: RepairMap, spec: ArchitectureSpec | None):
    module = contribution_module(model, repair_map.source, spec)
    if repair_map.kind in _BEFORE_THE_NORM:  # the post-norm recomputed: x̂(y·A)·s (rotation: x̂(yR) = x̂(y)R)
        eps = _norm_eps(module)

        def renormalised(mod, args, output):
            y = args[0]
            z = _rms_normalise(y.float() @ repair_map.matrix.to(y.device, torch.float32), eps)
            return (z * repair_map.scale.to(y.device, torch.float32)).type_as(y)

        return module.register_forward_hook(renormalised)

    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            return _apply(output, repair_map.matrix)
        return (_apply(output[0], repair_map.matrix),) + tuple(output[1:])

    return module.register_forward_hook(hook)


# -- folding -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _fold(model: nn.Module, repair_map: RepairMap, spec: ArchitectureSpec) -> None:
    module = contribution_module(model, repair_map.source, spec)
    if repair_map.kind in ("diagonal", *_BEFORE_THE_NORM):
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 1:
            raise BlockCBOError(f"cannot fold a {repair_map.kind} map into {type(module).__name__}: no scale vector")
        offset = spec.norm_weight_offset
        if repair_map.kind == "diagonal":
            scale = (weight.double() + offset) * repair_map.matrix.to(weight.device)
        else:  # A (rotation: R) into the norm's input projection, s into its weight
            _fold_linear(_post_norm_input(model, repair_map.source, spec), repair_map.matrix)
            scale = repair_map.scale.to(weight.device)
        weight.copy_((scale - offset).to(weight.dtype))
        return
    _fold_linear(module, repair_map.matrix)


def _post_norm_input(model: nn.Module, source: int, spec: ArchitectureSpec) -> nn.Module:
    block = get_layers(model, spec)[source]
    module = getattr(block, spec.post_norm_input or "", None)
    if not isinstance(module, nn.Module):
        raise BlockCBOError(
            f"the {spec.name!r} spec names no module feeding the post-norm (`post_norm_input`); a rotation repair "
            "cannot be folded"
        )
    return module


def _fold_linear(module: nn.Module, matrix: torch.Tensor) -> None:
    from transformers.pytorch_utils import Conv1D

    T = matrix.to(torch.float64)
    if isinstance(module, nn.Linear):  # y = x Wᵀ + b  →  y T = x (TᵀW)ᵀ + b T
        module.weight.copy_((T.t().to(module.weight.device) @ module.weight.double()).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_((module.bias.double() @ T.to(module.bias.device)).to(module.bias.dtype))
        return
    if isinstance(module, Conv1D):  # y = x W + b with W [in, out]
        module.weight.copy_((module.weight.double() @ T.to(module.weight.device)).to(module.weight.dtype))
        module.bias.copy_((module.bias.double() @ T.to(module.bias.device)).to(module.bias.dtype))
        return
    if isinstance(module, nn.Embedding):
        module.weight.copy_((module.weight.double() @ T.to(module.weight.device)).to(module.weight.dtype))
        return
    projection = dense_projection(module, _OUTPUT_PROJECTIONS)  # the branch's own output projection
    if projection is not None:
        _fold_linear(projection, T)
        return
    experts = getattr(module, "experts", None)
    if experts is not None:
        latent = getattr(module, "fc2_latent_proj", None)
        if isinstance(latent, nn.Linear):
            _fold_linear(latent, T)
        else:
            _fold_experts(experts, T)
        for name in _SHARED_EXPERTS:
            shared = getattr(module, name, None)
            if isinstance(shared, nn.Module):
                _fold_linear(shared, T)
        return
    raise BlockCBOError(
        f"cannot fold a repair map into {type(module).__name__}: no output projection found "
        f"(looked for {', '.join(_OUTPUT_PROJECTIONS)} and experts); do without the repair (`repair=false`)"
    )


def _fold_experts(experts: nn.Module, T: torch.Tensor) -> None:
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            _fold_linear(expert, T)
        return
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, nn.Parameter) or down.dim() != 3:
        raise BlockCBOError(f"cannot fold a repair map into the experts of {type(experts).__name__}")
    T = T.to(down.device)
    if getattr(experts, "is_transposed", False):  # [E, inter, d]: y = x W
        down.copy_((down.double() @ T).to(down.dtype))
    else:  # [E, d, inter]: y = x Wᵀ
        down.copy_((T.t() @ down.double()).to(down.dtype))
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, nn.Parameter):
        bias.copy_((bias.double() @ T).to(bias.dtype))


# -- fitting -------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once the stream after the gap is captured: the rest of the model is not run."""


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@dataclass
class _Normal:
    """Normal equations of one run, float64."""

    uu: torch.Tensor
    ur: torch.Tensor
    rr: float = 0.0
    gg: float = 0.0


def _capture_streams(model, layers, indices: list[int], ids, mask) -> dict[int, torch.Tensor]:
    """Run ``model`` until the last of ``indices`` and return each block's output (the stream after it)."""
    captured: dict[int, torch.Tensor] = {}
    last = max(indices)

    def hook_for(index):
        def hook(module, args, output):
            captured[index] = _first(output).detach()
            if index == last:
                raise _Stop

        return hook

    _forward_until_stop(model, [(layers[i], hook_for(i)) for i in sorted(set(indices))], ids, mask)
    return captured


def _forward_until_stop(model, hooks, ids, mask) -> None:
    """Run ``model`` with forward ``hooks`` [(module, hook)] attached until one raises `_Stop`; detach them."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _capture_contribution(model, layers, module, index: int, ids, mask):
    """Run ``model`` until block ``index``: the output of ``module`` (the contribution), the stream after block
    ``index`` and ``module``'s input (for a post-norm: what it normalises)."""
    captured = {}

    def grab(mod, args, output):
        captured["u"] = _first(output).detach().clone()  # cloned: some blocks add to it in place (Falcon)
        captured["y"] = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None

    def stop(mod, args, output):
        captured["h"] = _first(output).detach()
        raise _Stop

    _forward_until_stop(model, [(module, grab), (layers[index], stop)], ids, mask)
    return captured["u"], captured["h"], captured["y"]


def _token_weights(g: torch.Tensor, weighting: str) -> torch.Tensor:
    """[tokens, 1] weights of each token's squared error: 1 (uniform) or d / ‖g‖² (relative)."""
    if weighting == "uniform":
        return torch.ones(g.shape[0], 1, dtype=g.dtype)
    return 1.0 / g.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)


def _solve(normal: _Normal, kind: str, ridge: float) -> tuple[torch.Tensor, float, float]:
    """The ridge solution shrunk towards the identity (λ large: no repair) and the fit errors before and after."""
    uu, ur = normal.uu, normal.ur
    diag_uu, diag_ur = torch.diagonal(uu), torch.diagonal(ur)
    lam = ridge * float(diag_uu.mean())
    before = normal.rr - 2 * float(diag_ur.sum()) + float(diag_uu.sum())  # T = I
    if kind == "diagonal":
        t = (diag_ur + lam) / (diag_uu + lam)
        after = normal.rr - 2 * float((t * diag_ur).sum()) + float((t * t * diag_uu).sum())
        return t, before, after
    eye = torch.eye(uu.shape[0], dtype=uu.dtype)
    T = torch.linalg.solve(uu + lam * eye, ur + lam * eye)
    after = normal.rr - 2 * float((T * ur).sum()) + float((T * (uu @ T)).sum())
    return T, before, after


def _solve_rotation(normal: _Normal, gamma: torch.Tensor, ridge: float, rounds: int = 25):
    """min ‖R − x̂(y)·Rot·diag(s)‖² over orthogonal Rot and scale s (alternating: s in closed form, Rot by
    Procrustes on the cross term), shrunk towards (I, γ) = no repair; the best pair seen and the errors."""
    zz, zr, rr = normal.uu, normal.ur, normal.rr
    d = zz.shape[0]
    eye = torch.eye(d, dtype=zz.dtype)
    lam = ridge * float(torch.diagonal(zz).mean())

    def error(rot, scale):
        cross = torch.diagonal(rot.t() @ zr)
        power = torch.diagonal(rot.t() @ zz @ rot)
        return rr - 2 * float((scale * cross).sum()) + float((scale * scale * power).sum())

    before = error(eye, gamma)
    best = (before, eye, gamma)
    rot = eye
    for _ in range(rounds):
        scale = (torch.diagonal(rot.t() @ zr) + lam * gamma) / (torch.diagonal(rot.t() @ zz @ rot) + lam)
        value = error(rot, scale)
        if value < best[0]:
            best = (value, rot, scale)
        u, _, vh = torch.linalg.svd(zr * scale + lam * float(scale.abs().mean()) * eye)
        rot = u @ vh
    return best[1], best[2], before, best[0]


def _solve_renormalised(
    normal: _Normal,
    y: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    gamma: torch.Tensor,
    eps: float,
    ridge: float,
    steps: int = 40,
    max_tokens: int = 4096,
):
    """The linear ridge map ``u ↦ u·T`` carried behind the post-norm, so that it folds: with ``u = x̂(y)·γ``, fit
    ``x̂(y·A)·s`` (A any d×d, s a scale) to the ridge solution's outputs ``u·T`` by least squares over the calibration
    tokens. The ridge is the linear fit's (T is shrunk towards the identity, so the fitted map towards no repair);
    this second fit only moves the map where the norm can carry it. Started from A = diag(γ)·T with s in closed form,
    refined by L-BFGS on the cached activations (no gradient reaches the model) of every k-th token, at most
    ``max_tokens`` of them (the target is the ridge map's output, a smooth function of the token: measured on
    Gemma-3-270M, a fit on a quarter of 16,384 tokens has the same error on all of them, 4× faster). Returns A, s and
    the errors of (I, γ) and of the better of start and refinement against the real residual ``r`` over all tokens.
    ``y``, ``r``: [tokens, d] float32; ``w``: [tokens, 1]."""
    T, _, _ = _solve(normal, "linear", ridge)
    y, r, w = y.float(), r.float(), w.float()
    gamma32 = gamma.float()
    every = -(-y.shape[0] // max_tokens)
    fit_y, fit_w = y[::every], w[::every]
    target = (_rms_normalise(fit_y, eps) * gamma32) @ T.float()  # what the ridge map would add, token by token
    total = float((fit_w * target * target).sum()) or 1.0

    def misfit(A, scale, inputs, reference, weights):
        return (weights * (reference - _rms_normalise(inputs @ A, eps) * scale).pow(2)).sum()

    def error(A, scale) -> float:
        with torch.no_grad():
            return float(misfit(A, scale, y, r, w))

    before = error(torch.eye(y.shape[1]), gamma32)
    # started where the ridge map is, at its scale: the norm does not see A's scale, and a start rescaled to keep the
    # activations before the norm at their size (A comes out ~1,500× that on Gemma-3-270M) fitted far worse (stream
    # error 0.116 against 0.026), as did rescaling the fitted A, through eps (docs/results.md §3)
    A = (gamma32[:, None] * T.float()).contiguous().requires_grad_(True)  # L-BFGS views the gradient flat
    with torch.no_grad():
        n = _rms_normalise(fit_y @ A, eps)
        scale = (fit_w * n * target).sum(0) / (fit_w * n * n).sum(0).clamp_min(1e-30)
    scale.requires_grad_(True)
    start = (error(A, scale), A.detach().clone(), scale.detach().clone())
    optimiser = torch.optim.LBFGS([A, scale], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = misfit(A, scale, fit_y, target, fit_w) / total
        loss.backward()
        return loss

    if steps:
        optimiser.step(closure)
    refined = (error(A, scale), A.detach().clone(), scale.detach().clone())
    best = min((start, refined), key=lambda candidate: candidate[0])
    return best[1].double(), best[2].double(), before, best[0]


def _fit_refit(model, layers, spec, repair: Repair, block: int, targets, calibration, batch_size, gate) -> Refit:
    """The refit of block ``block``'s output projection on the model with ``repair`` (so far) applied."""
    device = next(model.parameters()).device
    projection = _projection(model, block, spec)
    hidden = targets[0].shape[-1]
    normal: RefitNormal | None = None
    with repair.applied(model, spec), BlockGates(model, gate=gate, spec=spec) as gates:
        gates.set_removed(repair.removed)
        for b, (_, ids, mask) in enumerate(calibration.batches(batch_size)):
            keep = mask.reshape(-1).bool().to(device)
            _, h, x = _capture_contribution(model, layers, projection, block, ids.to(device), mask.to(device))
            g = targets[b].double()
            x = x.reshape(-1, x.shape[-1])[keep].double().cpu()
            e = g - h.reshape(-1, hidden)[keep].double().cpu()
            if not (torch.isfinite(x).all() and torch.isfinite(e).all()):
                raise BlockCBOError(
                    f"the activations of block {block} are not finite (NaN or inf); load the model in float32 "
                    "(`dtype`) or check the weights"
                )
            normal = normal or RefitNormal(x.shape[-1], hidden)
            normal.add(x, e, g, _token_weights(g, repair.weighting))
    return normal.solve(block, repair.ridge)


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
    )
    passes = len(runs) + 1 + sum(len(r) for r in refitted)
    bar = tqdm(total=passes * len(calibration), desc="fitting repair maps", disable=not progress, leave=False)
    with frozen_eval(model), torch.no_grad():
        # the unpruned stream after every gap (and every refitted block), one pass (float32 on the CPU, valid tokens)
        after = sorted({stop - 1 for _, stop in runs} | {b for blocks in refitted for b in blocks})
        streams_of: dict[int, list[torch.Tensor]] = {i: [] for i in after}
        for _, ids, mask in calibration.batches(batch_size):
            streams = _capture_streams(model, layers, after, ids.to(device), mask.to(device))
            keep = mask.reshape(-1).bool()
            for i in after:
                streams_of[i].append(streams[i].reshape(-1, hidden)[keep.to(device)].float().cpu())
            bar.update(ids.shape[0])
        targets = [streams_of[stop - 1] for _, stop in runs]
        for j, (start, stop) in enumerate(runs):
            source = start - 1
            module = contribution_module(model, source, spec)
            run_kind = kind if source >= 0 else "linear"  # a gap at block 0 maps the (untied) embeddings
            normal = _Normal(
                uu=torch.zeros(hidden, hidden, dtype=torch.float64),
                ur=torch.zeros(hidden, hidden, dtype=torch.float64),
            )
            cached: dict[str, list[torch.Tensor]] = {"y": [], "r": [], "w": []}  # renormalised: the rows themselves
            with repair.applied(model, spec), BlockGates(model, gate=gate, spec=spec) as gates:
                gates.set_removed(repair.removed)
                for b, (_, ids, mask) in enumerate(calibration.batches(batch_size)):
                    keep = mask.reshape(-1).bool().to(device)
                    u, h, y = _capture_contribution(model, layers, module, stop - 1, ids.to(device), mask.to(device))
                    g = targets[j][b].double()
                    u = u.reshape(-1, hidden)[keep].double().cpu()
                    r = g - (h.reshape(-1, hidden)[keep].double().cpu() - u)
                    if run_kind == "rotation":  # regress on the normalised input of the post-norm instead
                        u = _rms_normalise(y, _norm_eps(module)).reshape(-1, hidden)[keep].double().cpu()
                    if not (torch.isfinite(u).all() and torch.isfinite(r).all()):
                        raise BlockCBOError(
                            f"the activations around removed blocks {start}..{stop - 1} are not finite (NaN or "
                            "inf); load the model in float32 (`dtype`) or check the weights"
                        )
                    w = _token_weights(g, weighting)
                    if run_kind == "renormalised":
                        cached["y"].append(y.reshape(-1, hidden)[keep].float().cpu())
                        cached["r"].append(r.float())
                        cached["w"].append(w.float())
                    wu = u if weighting == "uniform" else u * w  # uniform: the earlier sums, bit for bit
                    normal.uu += wu.t() @ u
                    normal.ur += wu.t() @ r
                    normal.rr += float((w * r * r).sum())
                    normal.gg += float((w * g * g).sum())
                    bar.update(ids.shape[0])
            targets[j] = streams_of[stop - 1] = []  # freed: the refits only need their own blocks' streams
            scale = None
            if run_kind in _BEFORE_THE_NORM:  # the post-norm's own scale γ: where the fit starts
                gamma = module.weight.detach().double().cpu() + spec.norm_weight_offset
            if run_kind == "rotation":
                matrix, scale, before, after = _solve_rotation(normal, gamma, ridge)
            elif run_kind == "renormalised":
                rows = [torch.cat(cached[key]) for key in ("y", "r", "w")]
                matrix, scale, before, after = _solve_renormalised(normal, *rows, gamma, _norm_eps(module), ridge)
            else:
                matrix, before, after = _solve(normal, run_kind, ridge)
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
