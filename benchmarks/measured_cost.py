"""Cost of the ``measured`` estimator's pair phase with and without its shortcuts, side by side in one run.

For the same calibration batch and the same pairs of removed blocks, times the pair phase three ways, interleaved:
- ``full logits``: each pair's forward from its first removed block, the ``[rows, T, V]`` logits formed (the code
  before the two shortcuts below);
- ``chunked head``: the LM head applied chunk by chunk to the final hidden state (:mod:`hf_blockcbo.hessian.head_kl`);
- ``chunked head + pair from single``: also each pair (i, j) started at block j from the state with block i removed.
Prints each variant's time per pair, the median of back-to-back ratios against ``full logits`` and the largest
difference in the measured KL.

    python benchmarks/measured_cost.py --model smollm2 --pair-blocks 3,7,13,15,17,26 --repeats 3
    python benchmarks/measured_cost.py --model gemma3 --pair-blocks 2,4,7,9,12 --repeats 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from _models import model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)
from tqdm.auto import tqdm

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet, calibration_samples
from hf_blockcbo.hessian.gradients import frozen_eval
from hf_blockcbo.hessian.head_kl import LinearHead
from hf_blockcbo.hessian.measured import FastPaths, _measure, _measure_pairs
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.surgery.gates import BlockGates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (one batch)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pair-blocks", default="3,7,13,15,17,26", help="every pair among these blocks is timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    config = BlockRemovalConfig(model=model_arg, seq_len=args.seq_len, num_samples=args.samples)
    full = calibration_samples(tokenizer, config)
    calibration = CalibrationSet(full.input_ids[: args.samples], full.attention_mask[: args.samples], full.source)
    blocks = sorted(int(b) for b in args.pair_blocks.split(","))
    pairs = list(itertools.combinations(blocks, 2))
    head = LinearHead.of(model)
    variants = {
        "full logits": lambda bar: _measure(model, gates, calibration, pairs, args.samples, bar, FastPaths(True)),
        "chunked head": lambda bar: _measure(
            model, gates, calibration, pairs, args.samples, bar, FastPaths(True, head)
        ),
        "chunked head + pair from single": lambda bar: _measure_pairs(
            model, gates, calibration, blocks, args.samples, bar, FastPaths(True, head)
        ),
    }
    times = {name: [] for name in variants}
    kls = {}
    with frozen_eval(model), BlockGates(model) as gates:
        n = gates.num_blocks
        for _ in range(args.repeats):
            for name, run in variants.items():
                with tqdm(disable=True) as bar:
                    began = time.perf_counter()
                    kls[name] = run(bar)[0]
                    times[name].append(time.perf_counter() - began)
    print(
        f"{args.model}: {len(pairs)} pairs among blocks {blocks} of {n}, {args.samples} × {args.seq_len} tokens, "
        f"vocabulary {head.weight.shape[0] if head else '?'}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved repeats"
    )
    print("| variant | s per pair (median) | speed-up (median of back-to-back ratios, min–max) | max abs ΔKL |")
    print("| --- | --- | --- | --- |")
    base = times["full logits"]
    for name, values in times.items():
        ratios = [b / v for b, v in zip(base, values, strict=True)]
        diff = float((kls[name] - kls["full logits"]).abs().max())
        print(
            f"| {name} | {statistics.median(values) / len(pairs):.3f} | {statistics.median(ratios):.2f}× "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {diff:.1e} |"
        )
    print(f"mean KL of the pairs: {float(kls['full logits'].mean()):.4f} nats")


if __name__ == "__main__":
    main()
