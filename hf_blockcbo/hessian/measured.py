"""The ``measured`` curvature: a pairwise expansion of the *measured* damage of removing blocks, forward passes only.

With D(x) the mean per-token KL divergence from the unpruned model's next-token distribution to the gated model's
(blocks with x_i = 1 switched off), the energy matrix is

    Q_ii = D(e_i),    Q_ij = ½·(D(e_i + e_j) − D(e_i) − D(e_j)),

so xᵀQx equals D exactly for every single and every pair removal, and sums pairwise interactions for larger sets.
Pairs are measured among the ``pairs`` blocks whose single removal hurts least (all blocks when ``pairs`` is None);
an unmeasured pair interacts by 0 (additive). The cross-entropy increase on the data's next tokens is measured by
the same forwards and kept beside it (``damage="ce"`` builds Q from it instead).

Many configurations run per forward: the calibration batch is repeated once per configuration and the gates take
one row of values per repeated sample; the blocks before a configuration's first removed block are not recomputed
(their output, the unpruned model's, is replayed from the reference pass), nor is that block itself (a removed block
returns its input). Configurations per forward are capped so the logits stay near 1 GB (a 262k vocabulary), and
the KL needs no log-softmax of the gated logits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..surgery.gates import BlockGates
from .gradients import frozen_eval
from .head_kl import LinearHead
from .replay import StopForward, forward_until_stopped, shared_prefix


logger = logging.getLogger(__name__)

DAMAGES = ("kl", "ce")
_LOGIT_BYTES = 1.0e9  # logits held per forward (rows × tokens × vocabulary × 4 bytes)
_CHUNKED_ROWS = 32  # repeated samples per forward when the head is chunked (no logits are formed)


@dataclass
class MeasuredDamage:
    """Per-sample damage of every measured configuration.

    Args:
        single (`dict[str, torch.Tensor]`): metric → ``[m, N]``, sample s, block i removed alone.
        pair (`dict[str, torch.Tensor]`): metric → ``[m, N, N]``, blocks i and j removed together (NaN: not measured).
        pair_blocks (`list[int]`): the blocks among which every pair was measured.
        configurations (`int`): configurations evaluated; ``tokens`` (`int`): model tokens processed in all.
    """

    single: dict[str, torch.Tensor]
    pair: dict[str, torch.Tensor]
    pair_blocks: list[int]
    configurations: int
    tokens: int
    seconds: float

    def per_sample_energy(self, damage: str = "kl") -> torch.Tensor:
        """``[m, N, N]``: each sample's Q (diagonal its single damages, off-diagonal half its pair interactions)."""
        if damage not in DAMAGES:
            raise BlockCBOError(f"damage must be one of {', '.join(DAMAGES)}, got {damage!r}")
        single, pair = self.single[damage].double(), self.pair[damage].double()
        q = 0.5 * (pair - single[:, :, None] - single[:, None, :])
        q = torch.nan_to_num(q, nan=0.0)
        index = torch.arange(single.shape[1])
        q[:, index, index] = single
        return q


def _valid_targets(mask: torch.Tensor) -> torch.Tensor:
    return (mask[:, 1:] * mask[:, :-1]).bool()


@dataclass
class Reference:
    """The unpruned model on one batch: next-token probabilities, their negative entropy, per-sample cross-entropy,
    and the input hidden state of every block (the shared prefix of every configuration)."""

    probs: torch.Tensor  # [b, T-1, V]
    neg_entropy: torch.Tensor  # [b, T-1]: Σ_v p log p
    ce: torch.Tensor  # [b]
    block_inputs: list[torch.Tensor]
    block_output_is_tuple: bool
    p_weight: torch.Tensor | None = None  # [b, T-1, d]: Wᵀp of a linear head (chunked-head measurement)
    p_bias: torch.Tensor | None = None  # [b, T-1]: b·p


@torch.no_grad()
def reference_pass(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor, head: LinearHead | None = None
) -> Reference:
    """The unpruned model on one batch; with ``head``, also the terms a chunked-head measurement needs."""
    inputs: dict[int, torch.Tensor] = {}
    kinds: list[bool] = []

    def pre(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(lambda m, a, out: kinds.append(isinstance(out, tuple))))
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    finally:
        for handle in handles:
            handle.remove()
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    probs = logp.exp()
    neg_entropy = (probs * logp).sum(-1)
    valid = _valid_targets(mask)
    picked = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ce = (picked * valid).sum(1) / valid.sum(1).clamp_min(1)
    p_weight, p_bias = head.reference_terms(probs) if head is not None else (None, None)
    return Reference(probs, neg_entropy, ce, [inputs[i] for i in range(len(layers))], kinds[0], p_weight, p_bias)


@torch.no_grad()
def configuration_damage(
    model: nn.Module,
    gates: BlockGates,
    ids: torch.Tensor,
    mask: torch.Tensor,
    configurations: Sequence[Sequence[int]],
    reference: Reference,
    share_prefix: bool = True,
    head: LinearHead | None = None,
    start: tuple[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL ``[b, c]``, CE increase ``[b, c]``) of each configuration (blocks switched off) on each sample, in one forward
    over the batch repeated ``c`` times with one row of gate values per repeated sample.

    With ``share_prefix`` the blocks before the first removed block of all ``configurations`` are not recomputed.
    KL(p ‖ q) per token is Σ p log p − Σ p·z + logsumexp(z) with z the gated logits: no log-softmax is materialised.
    With ``head`` (the reference computed with it) the logits are not formed either: the head is applied vocabulary
    chunk by chunk to the final hidden state (:mod:`hf_blockcbo.hessian.head_kl`). With ``start = (block, hidden)``
    the forward begins at ``block`` from ``hidden`` (``[b, T, d]``), the input of that block in a state every
    configuration shares before it (e.g. one removed block earlier, from :func:`removal_states`). In either case
    the blocks from there on that every configuration removes are not run either: a removed block returns its input.
    """
    b, c = ids.shape[0], len(configurations)
    values = torch.ones(c, b, gates.num_blocks)
    for k, removed in enumerate(configurations):
        values[k, :, list(removed)] = 0.0
    if start is not None:
        first, hidden = start
    else:
        first = min(min(removed) for removed in configurations) if share_prefix else 0
        hidden = reference.block_inputs[first]
    if start is not None or share_prefix:  # a block removed in every configuration returns its input: not run
        while first < gates.num_blocks and all(first in removed for removed in configurations):
            first += 1
    context = (
        shared_prefix(gates.layers, first, hidden.repeat(c, 1, 1), reference.block_output_is_tuple)
        if first > 0
        else contextlib.nullcontext()
    )
    if head is not None and reference.p_weight is None:
        raise BlockCBOError("a chunked-head measurement needs the reference computed with the same head")
    gates.set(values.view(c * b, -1))
    try:
        with context, head.capture(model) if head is not None else contextlib.nullcontext() as stub:
            logits = model(input_ids=ids.repeat(c, 1), attention_mask=mask.repeat(c, 1), use_cache=False).logits
    finally:
        gates.set(None)
    valid = _valid_targets(mask).to(torch.float64)
    counts = valid.sum(1).clamp_min(1)
    if head is not None:
        token_kl, token_ce = _head_damage(head, stub.hidden, ids, reference, c)
        kl = ((token_kl * valid).sum(-1) / counts).T
        ce = ((token_ce * valid).sum(-1) / counts).T - reference.ce.double()[:, None]
        return kl.clamp_min(0.0), ce
    kl = torch.empty(b, c, dtype=torch.float64)
    ce = torch.empty(b, c, dtype=torch.float64)
    for k in range(c):
        z = logits[k * b : (k + 1) * b, :-1].float()
        lse = torch.logsumexp(z, dim=-1)
        token_kl = (reference.neg_entropy - (reference.probs * z).sum(-1) + lse).double()
        token_ce = (lse - z.gather(-1, ids[:, 1:, None]).squeeze(-1)).double()
        kl[:, k] = (token_kl * valid).sum(1) / counts
        ce[:, k] = (token_ce * valid).sum(1) / counts - reference.ce.double()
    return kl.clamp_min(0.0), ce


def _head_damage(head: LinearHead, hidden: torch.Tensor, ids: torch.Tensor, reference: Reference, c: int):
    """Per-token (KL, CE) ``[c, b, T-1]`` from the final hidden state ``[c·b, T, d]`` of ``c`` configurations."""
    b, steps = ids.shape[0], ids.shape[1] - 1
    h = hidden[:, :-1].reshape(c * b * steps, -1)
    lse = head.logsumexp(h).double().view(c, b, steps)
    targets = ids[:, 1:].repeat(c, 1).reshape(-1)
    target = head.target_logits(h, targets).double().view(c, b, steps)
    weighted = (hidden[:, :-1].double().view(c, b, steps, -1) * reference.p_weight.double()).sum(-1)
    token_kl = reference.neg_entropy.double() - weighted - reference.p_bias.double() + lse
    return token_kl, lse - target


@torch.no_grad()
def removal_states(
    model: nn.Module,
    gates: BlockGates,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: Reference,
    removed: int,
    at: Sequence[int],
) -> dict[int, torch.Tensor]:
    """The input of every block in ``at`` (each after ``removed``) with block ``removed`` switched off, the blocks
    up to it replayed from the reference: the shared state of every pair ``(removed, j)`` up to block ``j``. The
    forward stops at the last block of ``at``."""
    if not at or min(at) <= removed:
        raise BlockCBOError(f"the blocks whose input is wanted must come after block {removed}, got {list(at)}")
    states: dict[int, torch.Tensor] = {}
    last = max(at)

    def pre(index):
        def hook(module, args, kwargs):
            states[index] = args[0] if args else kwargs["hidden_states"]
            if index == last:
                raise StopForward

        return hook

    # blocks 0..removed replayed: the removed block's output is its input, the reference's
    context = shared_prefix(
        gates.layers, removed + 1, reference.block_inputs[removed], reference.block_output_is_tuple
    )
    handles = [gates.layers[j].register_forward_pre_hook(pre(j), with_kwargs=True) for j in at]
    forward_until_stopped(model, ids, mask, handles, [context])
    return states


def chunk_by_first_block(configurations: list[tuple[int, ...]], per_forward: int):
    """Configurations grouped by their first removed block (so a forward shares the longest prefix), then chunked."""
    groups: dict[int, list[tuple[int, ...]]] = {}
    for config in configurations:
        groups.setdefault(min(config), []).append(config)
    for first in sorted(groups):
        group = groups[first]
        for lo in range(0, len(group), per_forward):
            yield group[lo : lo + per_forward]


@dataclass
class FastPaths:
    """How a model's measured forwards may be shortened, each checked against the full forward once (see
    :func:`fast_paths`): ``share_prefix`` replays the blocks before the first removed one; ``head`` (a
    `LinearHead`) applies the LM head chunk by chunk instead of forming the logits."""

    share_prefix: bool = False
    head: LinearHead | None = None


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {(gate, blocks, ...): (prefix, head)}


def _shortcut_agrees(name: str, full, measure) -> bool:
    try:
        fast = measure()
    except Exception as err:  # noqa: BLE001 - any failure means: do not take this shortcut on this model
        logger.warning("%s forward failed (%s); measuring without it", name, err)
        return False
    agrees = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast, full, strict=True))
    if not agrees:
        logger.warning("%s forward differs from the full forward on this model; measuring without it", name)
    return agrees


def fast_paths(
    model, gates, calibration: CalibrationSet, share_prefix: bool = True, chunked_head: bool = True
) -> FastPaths:
    """The `FastPaths` that give the full forward's damage for a late removal on one sample (a model whose
    decoder loop needs more of its layers than their output, or whose forward changes the logits after its head, is
    measured without that shortcut).

    The answer depends on the model's structure, not on its weights or data, so it is checked once per model, gate
    kind, layer count and hooks on the head (later calls, e.g. one `measure_states` per state in a benchmark, reuse it)."""
    head = LinearHead.of(model) if chunked_head else None
    module = model.get_output_embeddings()
    head_hooks = len(module._forward_hooks) + len(module._forward_pre_hooks) if module is not None else 0
    key = (gates.gate, gates.num_blocks, share_prefix, head is not None, head_hooks)
    known = _CHECKED.setdefault(model, {})
    if key not in known:
        known[key] = _check_fast_paths(model, gates, calibration, share_prefix, head)
    use_prefix, use_head = known[key]
    return FastPaths(share_prefix=use_prefix, head=head if use_head else None)


def _check_fast_paths(model, gates, calibration, share_prefix: bool, head: LinearHead | None) -> tuple[bool, bool]:
    """(shared prefix agrees, chunked head agrees) with the full forward on one sample and the
    removal of the last block but one."""
    device = next(model.parameters()).device
    ids, mask = calibration.input_ids[:1].to(device), calibration.attention_mask[:1].to(device)
    reference = reference_pass(model, gates.layers, ids, mask, head)
    late = [(max(gates.num_blocks - 2, 0),)]  # replayed blocks, a skipped one, then one block run
    full = configuration_damage(model, gates, ids, mask, late, reference, share_prefix=False)
    prefix = share_prefix and _shortcut_agrees(
        "shared-prefix", full, lambda: configuration_damage(model, gates, ids, mask, late, reference, True)
    )
    chunked = head is not None and _shortcut_agrees(
        "chunked-head", full, lambda: configuration_damage(model, gates, ids, mask, late, reference, False, head)
    )
    return prefix, chunked


def rows_per_forward(model: nn.Module, seq_len: int, head: LinearHead | None = None) -> int:
    """Repeated samples one forward may hold so its logits stay near ``_LOGIT_BYTES`` (a 262k vocabulary); with a
    chunked head no logits are formed and the cap is the hidden states' (``_CHUNKED_ROWS``)."""
    if head is not None:
        return _CHUNKED_ROWS
    head_module = model.get_output_embeddings()
    vocab = head_module.weight.shape[0] if head_module is not None else 1
    return max(1, int(_LOGIT_BYTES // (seq_len * vocab * 4)))


def _by_first_block(configurations):
    """The plain plan: configurations grouped by their first removed block, each forward from that block."""

    def plan(model, gates, ids, mask, reference, per_forward):
        for chunk in chunk_by_first_block(configurations, per_forward):
            yield chunk, None

    return plan


def _pairs_from_singles(pair_blocks):
    """The pairs plan: every pair ``(i, j)`` among ``pair_blocks`` started at block ``j`` from the state with block
    ``i`` removed (:func:`removal_states`, one partial forward per ``i``), so blocks i..j−1 are computed once per
    ``i`` instead of once per pair."""

    def plan(model, gates, ids, mask, reference, per_forward):
        for i in pair_blocks[:-1]:
            later = [j for j in pair_blocks if j > i]
            groups = [later[lo : lo + per_forward] for lo in range(0, len(later), per_forward)]
            states = removal_states(model, gates, ids, mask, reference, i, [group[0] for group in groups])
            for group in groups:
                yield [(i, j) for j in group], (group[0], states[group[0]])

    return plan


def _measure(model, gates, calibration, configurations, batch_size, bar, paths: FastPaths, plan=None):
    """(KL, CE increase) ``[m, len(configurations)]``; ``plan`` says which configurations share a forward and where
    it starts (default: grouped by first removed block)."""
    plan = plan or _by_first_block(configurations)
    m = len(calibration)
    rows = rows_per_forward(model, calibration.seq_len, paths.head)
    device = next(model.parameters()).device
    column = {tuple(config): k for k, config in enumerate(configurations)}
    kl = torch.empty(m, len(configurations), dtype=torch.float64)
    ce = torch.empty(m, len(configurations), dtype=torch.float64)
    for start, ids, mask in calibration.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        reference = reference_pass(model, gates.layers, ids, mask, paths.head)
        per_forward = max(1, rows // ids.shape[0])
        stop = start + ids.shape[0]
        for chunk, state in plan(model, gates, ids, mask, reference, per_forward):
            k, c = configuration_damage(
                model, gates, ids, mask, chunk, reference, paths.share_prefix, paths.head, start=state
            )
            columns = [column[tuple(config)] for config in chunk]
            kl[start:stop, columns] = k
            ce[start:stop, columns] = c
            bar.update(len(chunk) * ids.shape[0])
    return kl, ce


def _measure_pairs(model, gates, calibration, pair_blocks, batch_size, bar, paths: FastPaths):
    """(KL, CE increase) ``[m, P(P−1)/2]`` of every pair among ``pair_blocks`` (combinations order), each started
    from its single-removal state when the prefix may be shared."""
    pair_list = list(itertools.combinations(pair_blocks, 2))
    plan = _pairs_from_singles(pair_blocks) if paths.share_prefix else None
    return _measure(model, gates, calibration, pair_list, batch_size, bar, paths, plan)


def _measure_phase(model, gates, calibration, configurations, batch_size, desc, progress, paths: FastPaths):
    """`_measure` under one progress bar (one phase of a pass): (KL, CE increase), ``[m, len(configurations)]``."""
    total = len(configurations) * len(calibration)
    with tqdm(total=total, desc=desc, unit="cfg·sample", disable=not progress) as bar:
        return _measure(model, gates, calibration, configurations, batch_size, bar, paths)


def measure_state_damage(
    model: nn.Module,
    calibration: CalibrationSet,
    states: Sequence[Sequence[int]],
    gate: str = "auto",
    batch_size: int = 8,
    damage: str = "kl",
) -> torch.Tensor:
    """D of each state (its blocks removed) on each sample, ``[m, len(states)]``, measured as the passes measure it
    (per-sample mean over targets, the same fast paths): ``damage`` is ``"kl"`` or ``"ce"`` (CE increase)."""
    if len(calibration) == 0:
        raise BlockCBOError("the calibration set is empty; give at least one sample")
    if damage not in ("kl", "ce"):
        raise BlockCBOError(f"damage must be 'kl' or 'ce', got {damage!r}")
    configurations = [tuple(sorted(int(b) for b in s)) for s in states]
    if not configurations or any(not c for c in configurations):
        raise BlockCBOError("every state must remove at least one block")
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        paths = fast_paths(model, gates, calibration, True, True)
        unique = list(dict.fromkeys(configurations))
        kl, ce = _measure_phase(model, gates, calibration, unique, batch_size, "states", False, paths)
    value = kl if damage == "kl" else ce
    return value[:, [unique.index(c) for c in configurations]]


def measure_damage(
    model: nn.Module,
    calibration: CalibrationSet,
    gate: str = "auto",
    batch_size: int = 8,
    pairs: int | None = None,
    progress: bool = True,
    log=print,
    share_prefix: bool = True,
    chunked_head: bool = True,
) -> MeasuredDamage:
    """Measure D for every single removal, then for every pair among the ``pairs`` least damaging blocks.

    Args:
        model (`nn.Module`): a transformers causal LM (left as it was).
        calibration (`CalibrationSet`): the samples the damage is averaged over.
        gate (`str`, defaults to `"auto"`): gate kind.
        batch_size (`int`, defaults to 8): calibration samples per forward (each repeated once per configuration).
        pairs (`int`, *optional*): measure pairs among this many blocks (those with the lowest single KL);
            None or ≥ N: all pairs.
        log: where each phase's cost is reported (one line per phase).
        share_prefix (`bool`, defaults to `True`): do not recompute the blocks before a configuration's first
            removed block (their output is the unpruned model's, cached by the reference pass).
        chunked_head (`bool`, defaults to `True`): apply a linear LM head vocabulary chunk by chunk to the final hidden
            state instead of forming the logits (same damage, less time and memory).
    """
    if len(calibration) == 0:
        raise BlockCBOError("the calibration set is empty; give at least one sample")
    if pairs is not None and pairs < 0:
        raise BlockCBOError(f"measured_pairs must be >= 0, got {pairs!r}")
    began = time.perf_counter()
    tokens_per_config = int(calibration.attention_mask.sum())
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        n = gates.num_blocks
        paths = fast_paths(model, gates, calibration, share_prefix, chunked_head)
        singles = [(i,) for i in range(n)]
        single_kl, single_ce = _measure_phase(
            model, gates, calibration, singles, batch_size, "measured damage: singles", progress, paths
        )
        phase1 = time.perf_counter() - began
        log(
            f"measured damage: {n} single removals × {len(calibration)} samples "
            f"({n * tokens_per_config} tokens) in {phase1:.1f} s"
        )
        order = single_kl.mean(0).argsort().tolist()
        pair_blocks = sorted(order if pairs is None or pairs >= n else order[:pairs])
        pair_list = list(itertools.combinations(pair_blocks, 2))
        pair_kl = torch.full((len(calibration), n, n), float("nan"), dtype=torch.float64)
        pair_ce = pair_kl.clone()
        if pair_list:
            with tqdm(
                total=len(pair_list) * len(calibration),
                desc="measured damage: pairs",
                unit="cfg·sample",
                disable=not progress,
            ) as bar:
                kl, ce = _measure_pairs(model, gates, calibration, pair_blocks, batch_size, bar, paths)
            for k, (i, j) in enumerate(pair_list):
                pair_kl[:, i, j] = pair_kl[:, j, i] = kl[:, k]
                pair_ce[:, i, j] = pair_ce[:, j, i] = ce[:, k]
        log(
            f"measured damage: {len(pair_list)} pairs among {len(pair_blocks)} blocks "
            f"({len(pair_list) * tokens_per_config} tokens) in {time.perf_counter() - began - phase1:.1f} s"
        )
    configurations = n + len(pair_list)
    return MeasuredDamage(
        single={"kl": single_kl, "ce": single_ce},
        pair={"kl": pair_kl, "ce": pair_ce},
        pair_blocks=pair_blocks,
        configurations=configurations,
        tokens=(configurations + 2) * tokens_per_config,
        seconds=time.perf_counter() - began,
    )


@dataclass
class Expansion:
    """The measured damage expanded around a state s (a "round"): exact at s and at every state one swap away.

    With f_i = x_i XOR s_i the flip of block i, D(x) ≈ D(s) + Σ_i a_i f_i + Σ_{i<j} b_ij f_i f_j, where
    a_i = D(s ⊕ e_i) − D(s) and b_ij = D(s ⊕ e_i ⊕ e_j) − D(s ⊕ e_i) − D(s ⊕ e_j) + D(s) (pairs among ``flip_blocks``,
    0 elsewhere). Since f_i = (1 − 2s_i)·x_i + s_i is linear in x, this is again a quadratic form: :meth:`energy_matrix`
    is the N×N matrix Q with xᵀQx equal to the expansion for every x with Σx = |s| (the constant folded into the
    diagonal), so every solver consumes it unchanged.

    Args:
        centre (`list[int]`): the removed blocks of s.
        centre_damage (`torch.Tensor`): ``[m]``, D(s) per sample.
        flip (`torch.Tensor`): ``[m, N]``, D(s ⊕ e_i) per sample.
        flip_pair (`torch.Tensor`): ``[m, N, N]``, D(s ⊕ e_i ⊕ e_j) per sample (NaN: not measured).
        flip_blocks (`list[int]`): the blocks among which every pair of flips was measured.
    """

    centre: list[int]
    centre_damage: torch.Tensor
    flip: torch.Tensor
    flip_pair: torch.Tensor
    flip_blocks: list[int]
    configurations: int
    tokens: int
    seconds: float

    def energy_matrix(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The N×N energy of the expansion, averaged over the samples (or over ``rows``, e.g. a bootstrap draw)."""
        pick = slice(None) if rows is None else rows
        n = self.flip.shape[1]
        s = torch.zeros(n, dtype=torch.float64)
        s[self.centre] = 1.0
        c = 1.0 - 2.0 * s
        d0 = self.centre_damage[pick].double().mean()
        flip = self.flip[pick].double().mean(0)
        a = flip - d0
        pair = self.flip_pair[pick].double().mean(0)
        b = pair - flip[:, None] - flip[None, :] + d0
        b = torch.nan_to_num(b, nan=0.0)
        b.fill_diagonal_(0.0)
        q = 0.5 * b * c[:, None] * c[None, :]  # zero diagonal, as b's
        linear = a * c + c * (b @ s)
        constant = d0 + a @ s + 0.5 * (s @ b @ s)
        q += torch.diag(linear + constant / len(self.centre))  # Σx = |s|: the constant spread over the diagonal
        return q


def _flipped(centre: set[int], *blocks: int) -> tuple[int, ...]:
    return tuple(sorted(centre.symmetric_difference(blocks)))


def measure_expansion(
    model: nn.Module,
    calibration: CalibrationSet,
    centre: Sequence[int],
    gate: str = "auto",
    batch_size: int = 8,
    pairs: int | None = None,
    progress: bool = True,
    log=print,
    share_prefix: bool = True,
    chunked_head: bool = True,
    swaps: int | None = None,
) -> Expansion:
    """Measure D at ``centre``, at every single flip of it, and at every pair of flips among the centre's blocks and
    the outside blocks whose addition hurts least (``pairs`` flips in all, at least the centre and two outside;
    None: all), so the expansion is exact on every swap of one removed block for one of those outside blocks.

    With ``swaps=1`` (a trust region of one swap) only the pairs of flips that are swaps, one centre block for one
    of those outside blocks, are measured: the other pairs change the number of removed blocks or need two swaps,
    and interact by 0 in the expansion.
    """
    if len(calibration) == 0:
        raise BlockCBOError("the calibration set is empty; give at least one sample")
    centre_set = set(int(b) for b in centre)
    began = time.perf_counter()
    tokens_per_config = int(calibration.attention_mask.sum())
    m = len(calibration)
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        n = gates.num_blocks
        if not centre_set or not centre_set <= set(range(n)):
            raise BlockCBOError(f"the centre of a round must be a non-empty set of blocks in 0..{n - 1}")
        paths = fast_paths(model, gates, calibration, share_prefix, chunked_head)
        singles = {i: _flipped(centre_set, i) for i in range(n)}
        configurations = [tuple(sorted(centre_set))] + [cfg for cfg in singles.values() if cfg]
        kl, _ = _measure_phase(model, gates, calibration, configurations, batch_size, "round: flips", progress, paths)
        value = {cfg: kl[:, k] for k, cfg in enumerate(configurations)}
        zero = torch.zeros(m, dtype=torch.float64)
        centre_damage = value[configurations[0]]
        flip = torch.stack([value.get(singles[i], zero) for i in range(n)], dim=1)
        phase1 = time.perf_counter() - began
        log(
            f"round around {sorted(centre_set)}: {len(configurations)} states one flip away × {m} samples "
            f"({len(configurations) * tokens_per_config} tokens) in {phase1:.1f} s"
        )
        outside = [i for i in flip.mean(0).argsort().tolist() if i not in centre_set]
        width = n if pairs is None else max(pairs, len(centre_set) + 2)
        flip_blocks = sorted(list(centre_set) + outside[: max(0, width - len(centre_set))])
        pair_list = list(itertools.combinations(flip_blocks, 2))
        if swaps == 1:
            pair_list = [(i, j) for i, j in pair_list if (i in centre_set) != (j in centre_set)]
        pair_configs = list(dict.fromkeys(_flipped(centre_set, i, j) for i, j in pair_list))
        measured_pairs = [cfg for cfg in pair_configs if cfg]
        flip_pair = torch.full((m, n, n), float("nan"), dtype=torch.float64)
        if measured_pairs:
            kl, _ = _measure_phase(
                model, gates, calibration, measured_pairs, batch_size, "round: pairs of flips", progress, paths
            )
            value = {cfg: kl[:, k] for k, cfg in enumerate(measured_pairs)}
            for i, j in pair_list:
                flip_pair[:, i, j] = flip_pair[:, j, i] = value.get(_flipped(centre_set, i, j), zero)
        log(
            f"round around {sorted(centre_set)}: {len(measured_pairs)} states two flips away among "
            f"{len(flip_blocks)} blocks ({len(measured_pairs) * tokens_per_config} tokens) in "
            f"{time.perf_counter() - began - phase1:.1f} s"
        )
    count = len(configurations) + len(measured_pairs)
    return Expansion(
        centre=sorted(centre_set),
        centre_damage=centre_damage,
        flip=flip,
        flip_pair=flip_pair,
        flip_blocks=flip_blocks,
        configurations=count,
        tokens=(count + 2) * tokens_per_config,
        seconds=time.perf_counter() - began,
    )
