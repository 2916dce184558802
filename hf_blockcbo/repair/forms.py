"""The forms a repair map can take, each solved from the normal equations of one removed run (math only: no model).

``solve_map``: the ridge map ``u ↦ u·T`` (``linear``) or a scale per channel (``diagonal``), shrunk towards the
identity. Behind a post-norm, ``solve_rotation`` (an orthogonal map and a scale) and ``solve_renormalised`` (any d×d
map before the norm and a scale after it, fitted to reproduce the ridge map's outputs). repair/least_squares.py
accumulates the equations and says when each form is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
class NormalEquations:
    """Weighted normal equations of one least-squares fit (a gap's map or a refit), accumulated in float64 over
    calibration batches: ``uu`` = UᵀWU, ``ur`` = UᵀWR, ``rr`` = Σ w‖r‖² and ``gg`` = Σ w‖g‖² (the target's, for the
    relative error)."""

    uu: torch.Tensor
    ur: torch.Tensor
    rr: float = 0.0
    gg: float = 0.0

    @classmethod
    def zeros(cls, inputs: int, outputs: int) -> NormalEquations:
        return cls(
            uu=torch.zeros(inputs, inputs, dtype=torch.float64), ur=torch.zeros(inputs, outputs, dtype=torch.float64)
        )

    def add(self, u: torch.Tensor, r: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
        """Rows of one batch (valid tokens only, float64): inputs ``u``, residual ``r``, target ``g``, weights ``w``
        ([tokens, 1]; uniform weights are ones, so the sums are the unweighted ones bit for bit)."""
        wu = u * w
        self.uu += wu.t() @ u
        self.ur += wu.t() @ r
        self.rr += float((w * r * r).sum())
        self.gg += float((w * g * g).sum())


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def token_weights(g: torch.Tensor, weighting: str) -> torch.Tensor:
    """[tokens, 1] weights of each token's squared error: 1 (uniform) or d / ‖g‖² (relative)."""
    if weighting == "uniform":
        return torch.ones(g.shape[0], 1, dtype=g.dtype)
    return 1.0 / g.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)


def solve_map(normal: NormalEquations, kind: str, ridge: float) -> tuple[torch.Tensor, float, float]:
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


def solve_rotation(normal: NormalEquations, gamma: torch.Tensor, ridge: float, rounds: int = 25):
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


def solve_renormalised(
    normal: NormalEquations,
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
    T, _, _ = solve_map(normal, "linear", ridge)
    y, r, w = y.float(), r.float(), w.float()
    gamma32 = gamma.float()
    every = -(-y.shape[0] // max_tokens)
    fit_y, fit_w = y[::every], w[::every]
    target = (rms_normalise(fit_y, eps) * gamma32) @ T.float()  # what the ridge map would add, token by token
    total = float((fit_w * target * target).sum()) or 1.0

    def misfit(A, scale, inputs, reference, weights):
        return (weights * (reference - rms_normalise(inputs @ A, eps) * scale).pow(2)).sum()

    def error(A, scale) -> float:
        with torch.no_grad():
            return float(misfit(A, scale, y, r, w))

    before = error(torch.eye(y.shape[1]), gamma32)
    # started where the ridge map is, at its scale: the norm does not see A's scale, and a start rescaled to keep the
    # activations before the norm at their size (A comes out ~1,500× that on Gemma-3-270M) fitted far worse (stream
    # error 0.116 against 0.026), as did rescaling the fitted A, through eps (docs/results.md §3)
    A = (gamma32[:, None] * T.float()).contiguous().requires_grad_(True)  # L-BFGS views the gradient flat
    with torch.no_grad():
        n = rms_normalise(fit_y @ A, eps)
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
