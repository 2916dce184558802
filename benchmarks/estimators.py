"""Which energy predicts the damage? Every curvature estimator against BI, angular, norm ratio, SLEB and random, on
held-out text from two domains, with each method's cost — side by side in one run.

    python benchmarks/estimators.py --model smollm2 --removes 2,4,6,8 --eval-dir eval_data --output docs/results

(`eval_data` from `python examples/offline_eval_data.py --output eval_data`.) Writes ``estimators_<name>.md``,
``.csv`` and ``.png`` (predicted vs measured damage) into ``--output``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from _models import (  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)
    held_out_tests,
    model_argument,
    write_tables,
)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import build_calibration_set
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import calibrate, calibration_samples, validation_samples
from hf_blockcbo.selection.diagnose import diagnose, measure_states, plot_diagnoses
from hf_blockcbo.selection.scorers import ScoringContext, score
from hf_blockcbo.solvers.dispatch import solve_artifact
from hf_blockcbo.surgery.architectures import describe_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or any --model value of hf-blockcbo")
    parser.add_argument("--removes", default="2,4,6,8")
    parser.add_argument("--curvatures", default="measured,fisher,empirical")
    parser.add_argument("--baselines", default="bi,angular,norm_ratio,sleb,random")
    parser.add_argument("--num-samples", type=int, default=64, help="gradient estimators' calibration samples")
    parser.add_argument("--measured-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=16, help="validation / test samples per set")
    parser.add_argument("--diag-samples", type=int, default=8, help="held-out samples for the rank correlations")
    parser.add_argument("--random-states", type=int, default=10)
    parser.add_argument("--bootstrap-m", type=int, default=4)
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", help="file stem (default: --model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    removes = [int(m) for m in args.removes.split(",")]
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    name = args.name or args.model
    base = BlockRemovalConfig(
        model=model_arg,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        top_k=args.top_k,
        measured_samples=args.measured_samples,
        validation_samples=args.eval_samples,
    )
    eval_dir = Path(args.eval_dir)
    validation = validation_samples(tokenizer, base)
    tests = held_out_tests(tokenizer, eval_dir, args.eval_samples, args.seq_len)
    diag_set = build_calibration_set(tokenizer, str(eval_dir / "austen_emma.txt"), args.diag_samples, args.seq_len)
    rows, costs, diagnoses = [], {}, []
    calibration = calibration_samples(tokenizer, base)
    tokens_per_sample = args.seq_len

    def evaluate(method, m, blocks, how, seconds):
        out = {"model": name, "M": m, "method": method, "blocks": list(blocks), "how": how, "seconds": seconds}
        for label, data in tests.items():
            out[label] = measure_states(model, [blocks], data, batch_size=8).perplexity[0]
        rows.append(out)
        print(f"  M={m} {method:22s} {list(blocks)} " + " ".join(f"{out[k]:.2f}" for k in tests), flush=True)

    unpruned = {label: measure_states(model, [(0,)], data).unpruned_perplexity for label, data in tests.items()}
    for curvature in args.curvatures.split(","):
        config = base.replace(curvature=curvature)
        began = time.perf_counter()
        artifact = calibrate(model, tokenizer, config, source, progress=False, calibration=calibration)
        seconds = time.perf_counter() - began
        if curvature == "measured":
            tokens = int(artifact.metadata["measured_tokens"])
        else:
            tokens = args.num_samples * tokens_per_sample  # each through one forward and one backward
        costs[f"cbo[{curvature}]"] = (seconds, tokens)
        print(f"{curvature}: {seconds:.1f} s", flush=True)
        diagnosis = diagnose(
            model,
            artifact,
            config,
            diag_set,
            removes,
            random_count=args.random_states,
            bootstraps=100 if args.bootstrap_m in removes else 0,
        )
        diagnosis.bootstrap = {k: v for k, v in diagnosis.bootstrap.items() if k == args.bootstrap_m}
        diagnoses.append(diagnosis)
        print(diagnosis.markdown(), flush=True)
        for m in removes:
            t0 = time.perf_counter()
            cands = solve_artifact(artifact, config.replace(num_remove=m)).candidates
            val = measure_states(model, [c.blocks for c in cands], validation).perplexity
            best = min(range(len(cands)), key=lambda i: (val[i], i))
            t_sel = time.perf_counter() - t0
            evaluate(f"cbo[{curvature}] selected", m, cands[best].blocks, f"state {best} of {len(cands)}", t_sel)
            evaluate(f"cbo[{curvature}] ground", m, cands[0].blocks, "state 0", 0.0)
    ctx = ScoringContext.from_config(model, tokenizer, base, None, sleb_samples=8)
    ctx.calibration = calibration
    for method in args.baselines.split(","):
        for m in removes:
            t0 = time.perf_counter()
            chosen = score(method, ctx, m)[0]
            evaluate(method, m, chosen.blocks, "", time.perf_counter() - t0)
    # SLEB's forward budget: greedy steps × candidate blocks × samples × tokens
    n = len(describe_blocks(model))
    sleb_tokens = sum(n - s for s in range(max(removes))) * 8 * tokens_per_sample
    costs["sleb"] = (sum(r["seconds"] for r in rows if r["method"] == "sleb"), sleb_tokens)
    write(args, name, rows, tests, unpruned, costs, diagnoses, removes)


def write(args, name, rows, tests, unpruned, costs, diagnoses, removes) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(tests)
    lines = [
        f"# {name}: estimators and baselines on held-out text",
        "",
        "Unpruned: " + ", ".join(f"{k} {unpruned[k]:.2f}" for k in labels) + ".",
        "",
    ]
    for label in labels:
        lines += [
            f"## Test perplexity, {label}",
            "",
            "| method | " + " | ".join(f"M={m}" for m in removes) + " |",
            "| --- |" + " --- |" * len(removes),
        ]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for method in methods:
            cells = []
            for m in removes:
                hit = [r for r in rows if r["method"] == method and r["M"] == m]
                vals = [
                    r[label]
                    for r in rows
                    if r["M"] == m and not r["method"].endswith("ground") and r["method"] != "random"
                ]
                value = hit[0][label] if hit else math.nan
                mark = "**" if hit and value <= min(vals) + 1e-9 else ""
                cells.append(f"{mark}{value:.2f}{mark} {hit[0]['blocks'] if hit else ''}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Cost of choosing",
        "",
        "| method | seconds (2-core CPU) | model tokens processed |",
        "| --- | --- | --- |",
    ]
    for method, (seconds, tokens) in costs.items():
        lines.append(f"| {method} | {seconds:.1f} | {tokens:,} |")
    lines.append("")
    lines += ["## Does the energy predict the damage?", ""]
    for d in diagnoses:
        lines += [d.markdown(), ""]
    write_tables(out, f"estimators_{name}", lines, rows)
    plot_diagnoses(diagnoses, out / f"estimators_{name}.png", title=f"{name}: energy vs measured held-out KL")


if __name__ == "__main__":
    main()
