"""Which rule should pick among CBO's top-K states? Side by side in one run, on the library's own path
(`solve_with_rounds` with the defaults, as `prune` runs it): for every candidate its energy, its measured KL on the
calibration windows, its perplexity and KL on the validation split, and its test perplexity on two held-out domains;
then what each selection rule picks (energy, calibration KL, validation perplexity, validation KL) against the best
of BI, angular, norm ratio and SLEB.

    python examples/offline_eval_data.py --output eval_data
    python benchmarks/selection.py --model smollm2 --removes 2,4,6,8 --eval-dir eval_data --output docs/results

Writes ``selection_<name>.md`` and ``.csv`` into ``--output``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _models import (  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)
    blocks_at,
    held_out_tests,
    model_argument,
    write_tables,
)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import calibrate, calibration_samples, validation_samples
from hf_blockcbo.selection.diagnose import measure_states
from hf_blockcbo.selection.rounds import solve_with_rounds
from hf_blockcbo.selection.scorers import ScoringContext, score


def rules(validation_sizes: list[int]) -> dict[str, str]:
    """Rule → the candidate field it minimises."""
    out = {"energy (ground state)": "energy", "calibration KL": "calibration KL"}
    for n in validation_sizes:
        out[f"validation perplexity ({n})"] = f"validation perplexity ({n})"
        out[f"validation KL ({n})"] = f"validation KL ({n})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or any --model value of hf-blockcbo")
    parser.add_argument("--removes", default="2,4,6,8")
    parser.add_argument("--baselines", default="bi,angular,norm_ratio,sleb")
    parser.add_argument(
        "--states",
        default="",
        help="fixed states evaluated beside, e.g. 'sleb@6=13,14,15,16,17,18;...' (a baseline's known pick)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=8, help="calibration windows (the baselines' data)")
    parser.add_argument(
        "--data", help="calibration data for every method (default: the embedded novel); commas mix sources"
    )
    parser.add_argument(
        "--validation-data", help="validation data for the selection (default: the embedded validation split)"
    )
    parser.add_argument("--gsm8k", action="store_true", help="test on GSM8K chat records too (a third domain)")
    parser.add_argument(
        "--no-cbo",
        action="store_true",
        help="only the baselines and --states (label a state 'cbo' to stand for a known pick, e.g. from a run cut short)",
    )
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--validation-samples", default="16,64", help="validation set sizes compared")
    parser.add_argument("--test-samples", type=int, default=16)
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", help="file stem (default: --model)")
    parser.add_argument("--artifact", help="save the first pass here, or reuse it if the file exists")
    args = parser.parse_args()
    torch.manual_seed(0)
    removes = [int(m) for m in args.removes.split(",")]
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    name = args.name or args.model
    sizes = [int(n) for n in args.validation_samples.split(",")]
    base = BlockRemovalConfig(  # the README command's settings; the rest (rounds, trigger) the library's defaults
        model=model_arg,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        top_k=args.top_k,
        validation_samples=sizes[0],
        data=args.data,
        validation_data=args.validation_data,
    )
    calibration = calibration_samples(tokenizer, base)
    count = min(len(calibration), base.measured_samples)
    cal = CalibrationSet(calibration.input_ids[:count], calibration.attention_mask[:count], calibration.source)
    tests = held_out_tests(tokenizer, Path(args.eval_dir), args.test_samples, base.seq_len, extra=args.gsm8k)
    sets = {"calibration": cal, **tests}
    for n in sizes:
        sets[f"validation ({n})"] = validation_samples(tokenizer, base.replace(validation_samples=n))

    cached = Path(args.artifact) if args.artifact else None
    began = time.perf_counter()
    if args.no_cbo:
        artifact = None
    elif cached is not None and cached.exists():
        artifact = HessianArtifact.load(cached)
    else:
        artifact = calibrate(model, tokenizer, base, source, progress=True, calibration=calibration)
        if cached is not None:
            artifact.save(cached)
    print(f"first pass: {time.perf_counter() - began:.1f} s", flush=True)

    rows = []

    def measure(m, method, states, energies=None):
        found = {label: measure_states(model, states, data, batch_size=8) for label, data in sets.items()}
        for i, state in enumerate(states):
            row = {"model": name, "M": m, "method": method, "rank": i, "blocks": list(state)}
            row["energy"] = energies[i] if energies is not None else float("nan")
            row["calibration KL"] = found["calibration"].kl[i]
            for n in sizes:
                row[f"validation perplexity ({n})"] = found[f"validation ({n})"].perplexity[i]
                row[f"validation KL ({n})"] = found[f"validation ({n})"].kl[i]
            for label in tests:
                row[label] = found[label].perplexity[i]
            rows.append(row)
            print(
                f"  M={m} {method:10s} {list(state)} "
                + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
                flush=True,
            )

    for m in [] if args.no_cbo else removes:
        t0 = time.perf_counter()
        result, records = solve_with_rounds(model, artifact, base.replace(num_remove=m), lambda: calibration)
        ran = [r for r in (records or []) if r["round"] > 0]
        print(f"M={m}: {len(ran)} round(s), {time.perf_counter() - t0:.1f} s", flush=True)
        cands = result.candidates
        measure(m, "cbo", [c.blocks for c in cands], [c.energy for c in cands])
    ctx = ScoringContext.from_config(model, tokenizer, base, None, sleb_samples=count)
    ctx.calibration = calibration
    for method in [b for b in args.baselines.split(",") if b]:
        for m in removes:
            measure(m, method, [score(method, ctx, m)[0].blocks])
    for item in [i for i in args.states.split(";") if i]:
        label, rest = item.split("@")
        m, blocks = blocks_at(rest)
        measure(m, label, [blocks])
    write(args, name, rows, tests, removes, rules(sizes))


def write(args, name, rows, tests, removes, rules) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {name}: which rule picks among CBO's top-K (rounds and trigger: library defaults)", ""]
    lines += [f"Calibration {args.num_samples} × {args.seq_len} tokens, top-{args.top_k}.", ""]
    lines += [
        f"Calibration data: {args.data or 'embedded'}; validation data: {args.validation_data or 'embedded:validation'}.",
        "",
    ]
    for label in tests:
        lines += [f"## Test perplexity, {label}", "", "| pick | " + " | ".join(f"M={m}" for m in removes) + " |"]
        lines.append("| --- |" + " --- |" * len(removes))
        picks = {}
        for rule, key in rules.items():
            cells = []
            for m in removes:
                cands = [r for r in rows if r["M"] == m and r["method"] == "cbo"]
                pick = min(cands, key=lambda r: (r[key], r["rank"]))
                picks[(rule, m)] = pick
                cells.append(f"{pick[label]:.2f} {pick['blocks']}")
            lines.append(f"| cbo by {rule} | " + " | ".join(cells) + " |")
        cells = []
        for m in removes:
            cands = [r for r in rows if r["M"] == m and r["method"] == "cbo"]
            pick = min(cands, key=lambda r: r[label])
            cells.append(f"{pick[label]:.2f} {pick['blocks']}")
        lines.append("| cbo, best of its top-K (oracle) | " + " | ".join(cells) + " |")
        best_baseline = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "cbo"):
            cells = []
            for m in removes:
                hit = [r for r in rows if r["M"] == m and r["method"] == method][0]
                best_baseline[m] = min(best_baseline.get(m, float("inf")), hit[label])
                cells.append(f"{hit[label]:.2f} {hit['blocks']}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Ratio of each rule's pick to the best baseline (≤ 1: CBO as good or better):", ""]
        for rule in rules:
            ratios = [picks[(rule, m)][label] / best_baseline[m] for m in removes]
            wins = sum(r <= 1 + 1e-6 for r in ratios)  # the same state measured in two groupings
            lines.append(
                f"- {rule}: "
                + ", ".join(f"M={m} {r:.3f}" for m, r in zip(removes, ratios, strict=True))
                + f" ({wins} of {len(removes)})"
            )
        lines.append("")
    write_tables(out, f"selection_{name}", lines, rows)


if __name__ == "__main__":
    main()
