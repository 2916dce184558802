"""Cost of the Hessian pass on SmolLM2-135M (CPU), measured side by side in one run.

Prints:
- Hessian pass time / one plain forward+backward of the same batches (a training step's forward and backward with
  weight gradients, no optimizer step): goal ≤ 1.3;
- speed-up of the batched per-sample pass over the one-sample-at-a-time loop (the paper code's method): goal ≥ 4×
  at batch 8.

Each measurement is repeated (``--repeats``) in interleaved order and the minimum is kept.

    python benchmarks/hessian_cost.py --num-samples 16 --seq-len 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_blockcbo.data import build_calibration_set
from hf_blockcbo.hessian.gradients import compute_gate_gradients, frozen_eval, per_sample_loss
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.surgery.gates import BlockGates


def plain_forward_backward(model, calibration, batch_size):
    model.eval()
    model.requires_grad_(True)
    for _, ids, mask in calibration.batches(batch_size):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        per_sample_loss(logits, ids, mask).sum().backward()
    model.zero_grad(set_to_none=True)


def one_sample_loop(model, calibration):
    rows = []
    with frozen_eval(model), BlockGates(model) as gates:
        for i in range(len(calibration)):
            ids, mask = calibration.input_ids[i : i + 1], calibration.attention_mask[i : i + 1]
            alpha = torch.ones(gates.num_blocks, requires_grad=True)
            gates.set(alpha)
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                per_sample_loss(logits, ids, mask).sum().backward()
            rows.append(alpha.grad)
    return torch.stack(rows)


def one_sample_loop_with_weight_grads(model, calibration):
    """The loop as research code usually runs it: weights left trainable, so backward also builds weight gradients."""
    rows = []
    model.eval()
    model.requires_grad_(True)
    with BlockGates(model) as gates:
        for i in range(len(calibration)):
            ids, mask = calibration.input_ids[i : i + 1], calibration.attention_mask[i : i + 1]
            alpha = torch.ones(gates.num_blocks, requires_grad=True)
            gates.set(alpha)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            per_sample_loss(logits, ids, mask).sum().backward()
            model.zero_grad(set_to_none=True)
            rows.append(alpha.grad)
    return torch.stack(rows)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    source = resolve_model(args.model)
    model, tokenizer = load_model(source)
    calibration = build_calibration_set(tokenizer, None, num_samples=args.num_samples, seq_len=args.seq_len)
    times = {"hessian": [], "plain": [], "loop": [], "loop_weights": []}
    A = loop_rows = None
    for _ in range(args.repeats):
        t, (A, _) = timed(lambda: compute_gate_gradients(model, calibration, args.batch_size, progress=False))
        times["hessian"].append(t)
        t, _ = timed(lambda: plain_forward_backward(model, calibration, args.batch_size))
        times["plain"].append(t)
        t, loop_rows = timed(lambda: one_sample_loop(model, calibration))
        times["loop"].append(t)
        t, _ = timed(lambda: one_sample_loop_with_weight_grads(model, calibration))
        times["loop_weights"].append(t)
    best = {k: min(v) for k, v in times.items()}
    err = float((A - loop_rows).abs().max() / loop_rows.abs().max())
    print(
        f"model {source.model_id}: {args.num_samples} samples × {args.seq_len} tokens, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  Hessian pass (batched per-sample):  {best['hessian']:.2f} s")
    print(f"  plain forward+backward:            {best['plain']:.2f} s")
    print(f"  one-sample-at-a-time loop:         {best['loop']:.2f} s (weights frozen)")
    print(f"  same loop, weights trainable:      {best['loop_weights']:.2f} s")
    print(f"  ratio Hessian / plain fwd+bwd:      {best['hessian'] / best['plain']:.2f}   (goal ≤ 1.3)")
    print(f"  speed-up over the per-sample loop: {best['loop'] / best['hessian']:.2f}×  (goal ≥ 4× at batch 8)")
    print(f"  ... over the loop with weight grads: {best['loop_weights'] / best['hessian']:.2f}×")
    print(f"  max relative difference of A:      {err:.2e}")


if __name__ == "__main__":
    main()
