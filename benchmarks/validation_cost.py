"""Cost of scoring the top-K states by validation perplexity, one gated forward per state against one trie, side by
side in one run.

For the same validation set and the same states, times two ways, interleaved:
- ``one state at a time``: :func:`hf_blockcbo.evaluation.likelihood.perplexity` per state, gated (the code before
  :mod:`hf_blockcbo.evaluation.many_states`);
- ``one trie``: :func:`hf_blockcbo.evaluation.many_states.perplexities` (blocks a group of states shares run once,
  removed blocks skipped).
Prints each way's seconds, the median of back-to-back ratios and the largest relative difference in perplexity.

    hf-blockcbo prune --remove 6 --seq-len 128 --top-k 8 --validation-samples 64 --output smollm2-pruned
    python benchmarks/validation_cost.py --model smollm2 --provenance smollm2-pruned/block_removal.json --repeats 3

(the states of ``--provenance`` are the candidates that run validated, its ``spectrum``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _models import model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.evaluation.many_states import perplexities
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import validation_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--states", default=None, help="';'-separated states, e.g. '4,14;4,15'")
    parser.add_argument("--provenance", default=None, help="a block_removal.json: its validated candidates")
    parser.add_argument("--validation-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    config = BlockRemovalConfig(model=model_arg, seq_len=args.seq_len, validation_samples=args.validation_samples)
    validation = validation_samples(tokenizer, config)
    if args.provenance:
        states = [c["blocks"] for c in json.loads(Path(args.provenance).read_text())["spectrum"]]
    elif args.states:
        states = [sorted(int(b) for b in s.split(",")) for s in args.states.split(";")]
    else:
        parser.error("give --states or --provenance")
    variants = {
        "one state at a time": lambda: [perplexity(model, validation, s) for s in states],
        "one trie": lambda: perplexities(model, validation, states),
    }
    seconds = {name: [] for name in variants}
    scores = {}
    perplexities(model, validation, states[:2])  # warm-up (and the once-per-model replay check)
    for _ in range(args.repeats):
        for name, run in variants.items():
            began = time.perf_counter()
            scores[name] = run()
            seconds[name].append(time.perf_counter() - began)
    ratios = [a / b for a, b in zip(seconds["one state at a time"], seconds["one trie"], strict=True)]
    worst = max(abs(a / b - 1) for a, b in zip(scores["one trie"], scores["one state at a time"], strict=True))
    print(f"{len(states)} states × {len(validation)} samples × {args.seq_len} tokens, {args.repeats} repeats")
    print("| way | seconds (median) | speed-up (median of back-to-back ratios, min–max) |")
    print("| --- | --- | --- |")
    print(f"| one state at a time | {statistics.median(seconds['one state at a time']):.1f} | 1 |")
    print(
        f"| one trie | {statistics.median(seconds['one trie']):.1f} | **{statistics.median(ratios):.2f}×** "
        f"({min(ratios):.2f}–{max(ratios):.2f}) |"
    )
    print(f"largest relative difference in perplexity: {worst:.1e}")


if __name__ == "__main__":
    main()
