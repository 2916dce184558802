"""Is CBO's pick better or worse than the best baseline beyond the noise of the test windows? For the picks of a
`benchmarks/selection.py` run (its CSV: CBO's pick by a selection rule, and each baseline's state at every M), the
test windows are measured one by one, gate-masked, and a paired bootstrap over the windows gives a 95 % interval for
the ratio of CBO's test perplexity to the best baseline's (the same windows resampled for both).

    python benchmarks/significance.py --model smollm2 --csv docs/results/selection/selection_smollm2_mixed.csv \
        --gsm8k --output docs/results/selection

Writes ``significance_<csv stem>.md`` and ``.csv`` into ``--output``. The per-window perplexities recombine to the
selection run's figure (checked, printed), so the intervals belong to the table they qualify.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from _models import (  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)
    held_out_tests,
    model_argument,
    write_tables,
)

from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.evaluation.likelihood import paired_ratio_interval
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.selection.diagnose import measure_states


def picks(rows: list[dict], rule: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """M → {method: state}: CBO's pick by ``rule`` (lowest, ties by rank, as selection.py) and each baseline's."""
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for m in sorted({int(r["M"]) for r in rows}):
        at = [r for r in rows if int(r["M"]) == m]
        cbo = min((r for r in at if r["method"] == "cbo"), key=lambda r: (float(r[rule]), int(r["rank"])))
        out[m] = {"cbo": tuple(json.loads(cbo["blocks"]))}
        for r in at:
            if r["method"] != "cbo":
                out[m][r["method"]] = tuple(json.loads(r["blocks"]))
    return out


def per_window_nll(model, states: list[tuple[int, ...]], data: CalibrationSet) -> tuple[np.ndarray, np.ndarray]:
    """[states, windows] summed next-token NLL of each window, and each window's predicted-token count."""
    nll = np.zeros((len(states), len(data)))
    counts = (data.attention_mask[:, 1:] * data.attention_mask[:, :-1]).sum(1).double().numpy()
    for i in range(len(data)):
        one = CalibrationSet(data.input_ids[i : i + 1], data.attention_mask[i : i + 1], data.source)
        found = measure_states(model, states, one, batch_size=1)
        nll[:, i] = np.log(found.perplexity) * counts[i]
    return nll, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or any --model value of hf-blockcbo")
    parser.add_argument("--csv", required=True, help="a selection.py CSV")
    parser.add_argument("--rule", help="the CBO selection column (default: the largest validation perplexity one)")
    parser.add_argument("--test-samples", type=int, default=16, help="as in the selection run")
    parser.add_argument("--seq-len", type=int, default=128, help="as in the selection run")
    parser.add_argument("--gsm8k", action="store_true", help="the selection run tested on GSM8K too")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results/selection")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = list(csv.DictReader(Path(args.csv).open(encoding="utf-8")))
    rule = args.rule or max(
        (k for k in rows[0] if k.startswith("validation perplexity")), key=lambda k: int(k.split("(")[1][:-1])
    )
    chosen = picks(rows, rule)
    states = sorted({s for per_m in chosen.values() for s in per_m.values()})
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    tests = held_out_tests(tokenizer, Path(args.eval_dir), args.test_samples, args.seq_len, extra=args.gsm8k)
    out_rows = []
    for label, data in tests.items():
        nll, counts = per_window_nll(model, states, data)
        total = {s: float(np.exp(nll[k].sum() / counts.sum())) for k, s in enumerate(states)}
        for m, per_m in chosen.items():
            recorded = {
                r["method"]: float(r[label])
                for r in rows
                if int(r["M"]) == m and tuple(json.loads(r["blocks"])) == per_m[r["method"]]
            }
            for method, state in per_m.items():  # the windows one by one recombine to the selection run's figure
                print(f"{label} M={m} {method}: {total[state]:.3f} (selection run {recorded[method]:.3f})")
            best = min((meth for meth in per_m if meth != "cbo"), key=lambda meth: total[per_m[meth]])
            a, b = nll[states.index(per_m["cbo"])], nll[states.index(per_m[best])]
            ratio, lo, hi = paired_ratio_interval(a, b, counts, args.draws)
            verdict = (
                "same state"
                if per_m["cbo"] == per_m[best]
                else ("better" if hi < 1 else "worse" if lo > 1 else "within noise")
            )
            out_rows.append(
                {
                    "test": label,
                    "M": m,
                    "cbo": list(per_m["cbo"]),
                    "best baseline": best,
                    "baseline state": list(per_m[best]),
                    "ratio": ratio,
                    "low": lo,
                    "high": hi,
                    "verdict": verdict,
                }
            )
    write(args, rule, out_rows)


def write(args, rule: str, rows: list[dict]) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"significance_{Path(args.csv).stem}"
    lines = [
        f"# CBO's pick against the best baseline, with 95 % paired-bootstrap intervals ({Path(args.csv).name})",
        "",
        f"CBO's pick: lowest `{rule}` among its top-K. {args.test_samples} test windows of {args.seq_len} tokens per "
        f"domain, {args.draws} resamples. Command: `python benchmarks/significance.py --model {args.model} --csv "
        f"{args.csv}{' --gsm8k' if args.gsm8k else ''}`.",
        "",
        "| test | M | CBO / best baseline | 95 % interval | best baseline (state) | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['test']} | {r['M']} | {r['ratio']:.3f} | {r['low']:.3f}–{r['high']:.3f} | "
            f"{r['best baseline']} {r['baseline state']} | {r['verdict']} |"
        )
    for label in dict.fromkeys(r["test"] for r in rows):
        mine = [r for r in rows if r["test"] == label]
        counts = {v: sum(r["verdict"] == v for r in mine) for v in ("better", "same state", "within noise", "worse")}
        lines.append("")
        lines.append(f"- {label}: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + f" (of {len(mine)})")
    write_tables(out, stem, lines, rows)


if __name__ == "__main__":
    main()
