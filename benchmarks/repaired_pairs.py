"""Is one repaired state better than another? Paired 95 % intervals over the same held-out test windows.

    python benchmarks/repaired_pairs.py --model gemma3 --fit eval_data/gsm8k_fit_text.jsonl \
        --pairs "7,8,14,15/6,7,8,9;7,8,14,15/14,15,16,17" --eval-dir eval_data

(`eval_data` from `python examples/offline_eval_data.py --output eval_data`.) Each state of each pair ``a/b`` is
repaired with the config's repair fitted on ``--fit`` (the config's ``data``; ``default``: the default fit data),
then scored on *Persuasion*, *As You Like It* and GSM8K (the windows of `repair_sweep.py --gsm8k`); for each pair and
domain it prints both perplexities and a/b with its 95 % paired-bootstrap interval over the test windows (an interval
above 1: a is worse beyond the windows' noise). One model load.
"""

from __future__ import annotations

import argparse
import json

import torch
from _models import held_out_tests, model_argument

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import repair_samples
from hf_blockcbo.evaluation.likelihood import paired_ratio_interval, window_losses
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.repair.least_squares import fit_repair


def parse_pairs(text: str) -> list[tuple[list[int], list[int]]]:
    """`"1,2/3,4;5/6"` → `[([1, 2], [3, 4]), ([5], [6])]`."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        a, b = part.split("/")
        pairs.append(([int(x) for x in a.split(",")], [int(x) for x in b.split(",")]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--fit", default="default", help="the repair's fit data: default or a data value")
    parser.add_argument("--pairs", required=True, help='states a/b separated by ";", e.g. "4,14/13,14"')
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--eval-dir", default="eval_data")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    tests = held_out_tests(tokenizer, args.eval_dir, args.eval_samples, args.seq_len, extra=True)
    config = BlockRemovalConfig(model=model_arg, seq_len=args.seq_len)
    if args.fit != "default":
        config = config.replace(data=args.fit)
    samples = repair_samples(tokenizer, config)
    losses = {}
    for a, b in parse_pairs(args.pairs):
        for blocks in (a, b):
            if tuple(blocks) not in losses:
                repair = fit_repair(model, blocks, samples, config.repair_settings, config.batch_size)
                with repair.applied(model):
                    losses[tuple(blocks)] = {k: window_losses(model, t, blocks) for k, t in tests.items()}
        for label in tests:
            la, lb = losses[tuple(a)][label], losses[tuple(b)][label]
            ratio, low, high = paired_ratio_interval(la.nll, lb.nll, la.tokens)
            row = {"fit": args.fit, "a": a, "b": b, "test": label, "a ppl": round(la.perplexity, 2)}
            row.update({"b ppl": round(lb.perplexity, 2), "a/b": round(ratio, 3), "low": round(low, 3)})
            row["high"] = round(high, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
