"""Per-sample gradients of the cross-entropy with respect to the block gates: the m×N matrix A.

One forward and one backward per batch: the gates get one value per sample (shape ``[batch, N]``, all ones), each
sample's loss depends only on its own row, so the gradient of the *sum* of per-sample losses with respect to the gate
tensor is, row by row, every sample's own gradient. Weights are frozen: no weight gradient is computed or stored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - older transformers

    class GradientCheckpointingLayer:  # noqa: D101 - a stand-in nothing is an instance of
        pass


from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..surgery.gates import BlockGates
from .resume import PartialRows


logger = logging.getLogger(__name__)


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its real (unpadded) target tokens, shape ``[batch]``."""
    targets = input_ids[:, 1:]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(torch.float32)
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        raise BlockCBOError("a calibration sample has no target token (fewer than 2 real tokens); drop it")
    return (token_loss * valid).sum(dim=1) / counts


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    # transformers checkpoints a layer only while that layer is in training mode: switch on just the checkpointed
    # layers' own flag (their dropout children stay in eval), so --gradient-checkpointing really saves memory
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False):
            module.training = True
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_model_targets(logits: torch.Tensor, generator: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """Next tokens drawn from the model's own predictive distribution, ``[batch, T]`` (position t holds the token
    drawn after position t), chunk by chunk over positions so a 262k vocabulary never needs a second full copy."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    drawn = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    for lo in range(0, flat.shape[0], chunk):
        probs = torch.softmax(flat[lo : lo + chunk].float(), dim=-1).cpu()
        drawn[lo : lo + chunk] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    return drawn.view(logits.shape[:-1])


def fisher_sample_seed(seed: int, index: int) -> int:
    """The generator seed of calibration sample ``index`` under the Fisher estimator's ``seed``."""
    return seed * 1_000_003 + index


def fisher_sample_loss(logits: torch.Tensor, drawn: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(1/√T)·Σ_t −log p(ŷ_t) per sample, ŷ drawn from the unpruned model: E[∇∇ᵀ] is the Hessian at α = 1 of the
    mean per-token KL(unpruned ‖ gated), so ½·xᵀHx estimates that KL."""
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(torch.float32)
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), drawn[:, :-1].reshape(-1), reduction="none"
    ).view(valid.shape)
    counts = valid.sum(dim=1)
    if bool((counts == 0).any()):
        raise BlockCBOError("a calibration sample has no target token (fewer than 2 real tokens); drop it")
    return (token_loss * valid).sum(dim=1) / counts.sqrt()


def gate_gradients_for_batch(
    model: nn.Module,
    gates: BlockGates,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sample_seeds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient rows ``[batch, N]`` (float32) and per-sample losses ``[batch]`` for one batch, in one backward.

    Without ``sample_seeds`` the rows are gradients of each sample's mean cross-entropy on the data's next tokens (the
    paper's empirical estimator). With ``sample_seeds`` (one per sample) the targets are drawn from the model's own
    predictive distribution (the same forward's logits, detached; sample i with a generator seeded by
    ``sample_seeds[i]``, so the draw does not depend on the batch) and the rows are those of
    :func:`fisher_sample_loss`: the Fisher estimator, at the same cost.
    """
    device = _model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    alpha = torch.ones(input_ids.shape[0], gates.num_blocks, dtype=torch.float32, device=device, requires_grad=True)
    gates.set(alpha)
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if sample_seeds is None:
                losses = per_sample_loss(logits, input_ids, attention_mask)
            else:
                drawn = torch.stack(
                    [
                        sample_model_targets(logits[i : i + 1], torch.Generator().manual_seed(seed))[0]
                        for i, seed in enumerate(sample_seeds)
                    ]
                )
                losses = fisher_sample_loss(logits, drawn, attention_mask)
            del logits
            losses.sum().backward()
    finally:
        gates.set(None)
    return alpha.grad.detach().float(), losses.detach().float()


def _check_finite(rows: torch.Tensor, start: int, block_names: list[str]) -> None:
    bad = ~torch.isfinite(rows)
    if bool(bad.any()):
        sample, block = (int(v) for v in bad.nonzero()[0])
        raise BlockCBOError(
            f"non-finite gradient for sample {start + sample} at block {block} ({block_names[block]}); "
            "check the model dtype (try float32) and the data (empty or corrupted samples)"
        )


def compute_gate_gradients(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = True,
    block_names: list[str] | None = None,
    checkpoint: PartialRows | None = None,
    checkpoint_every: int = 0,
    first_index: int = 0,
    lockstep: bool = False,
    fisher_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gate gradients A (``[m, N]`` float32) and per-sample losses at α = 1 (``[m]``).

    Args:
        model (`nn.Module`): a transformers causal LM; its weights are left untouched.
        calibration (`CalibrationSet`): tokenised samples.
        batch_size (`int`, defaults to 8): samples per forward/backward.
        gate (`str`, defaults to `"auto"`): gate kind, see :class:`~hf_blockcbo.surgery.gates.BlockGates`.
        checkpoint (`PartialRows`, *optional*): where rows done so far are kept; rows found there are not recomputed.
        checkpoint_every (`int`, defaults to 0): write the checkpoint every this many batches (0: never).
        first_index (`int`): index of the first sample in the whole calibration set (for error messages).
        lockstep (`bool`, defaults to `False`): every process runs the same number of batches (FSDP: each forward
            is a collective); short shards repeat their last batch and drop its rows, resumed rows are cut to the
            count every process has.
        fisher_seed (`int`, *optional*): draw the targets from the model itself (Fisher estimator); the draw of
            sample i depends only on (seed, i), so shards, resumes and batch sizes give the same rows.
    """
    if len(calibration) == 0:
        raise BlockCBOError("the calibration set is empty; give at least one sample")
    if batch_size <= 0:
        raise BlockCBOError(f"`batch_size` must be positive, got {batch_size}")
    rows, losses = [], []
    done = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        rows, losses = [resumed[0]], [resumed[1]]
        done = resumed[0].shape[0]
    padding_batches = 0
    if lockstep:
        from .distributed import lockstep_counts

        done, _, padding_batches = lockstep_counts(done, len(calibration), batch_size)
        if resumed is not None:
            rows, losses = [resumed[0][:done]], [resumed[1][:done]]
    if done:
        logger.warning("resuming the Hessian pass: %d of %d samples already done", done, len(calibration))
    remaining = CalibrationSet(calibration.input_ids[done:], calibration.attention_mask[done:], calibration.source)
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        names = block_names or [f"block {i}" for i in range(gates.num_blocks)]
        bar = tqdm(total=len(calibration), initial=done, desc="Hessian pass", unit="sample", disable=not progress)
        batches = list(remaining.batches(batch_size))
        if padding_batches:
            _, pad_ids, pad_mask = batches[-1] if batches else next(calibration.batches(1))
            for _ in range(padding_batches):  # rows dropped: only the collective forwards/backwards matter
                gate_gradients_for_batch(model, gates, pad_ids, pad_mask)
        for batch_no, (start, ids, mask) in enumerate(batches, start=1):
            seeds = None
            if fisher_seed is not None:
                seeds = [fisher_sample_seed(fisher_seed, first_index + done + start + i) for i in range(ids.shape[0])]
            grad, loss = gate_gradients_for_batch(model, gates, ids, mask, seeds)
            _check_finite(grad, first_index + done + start, names)
            rows.append(grad.cpu())
            losses.append(loss.cpu())
            bar.update(ids.shape[0])
            if checkpoint is not None and checkpoint_every and batch_no % checkpoint_every == 0:
                checkpoint.save(torch.cat(rows), torch.cat(losses))
        bar.close()
    return torch.cat(rows), torch.cat(losses)
