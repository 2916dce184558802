"""How the repair's ridge and fit data move the share of the damage it removes, on held-out text of two domains.

    python benchmarks/repair_sweep.py --model smollm2 --states "cbo=13,14,15,16,17,18;bi=13,14,15,17,25,26" \
        --ridges 0.3,1,3,10 --eval-dir eval_data --output docs/results

(`eval_data` from `python examples/offline_eval_data.py --output eval_data`.) Every state (given by name and blocks,
e.g. the picks of a `benchmarks/repair.py` run) is measured unrepaired once, then repaired with every fit: each ridge
in ``--ridges`` times each refit depth in ``--depths`` times each data choice in ``--fits`` (``default``: the config's
default fit data, ``embedded,embedded:play`` since 2026-12-08; otherwise a ``repair_data`` value, whose comma-separated
sources share the windows, e.g. ``embedded`` for the novel alone). For each: test perplexity on *Persuasion*
and *As You Like It* (with ``--gsm8k``, GSM8K chat records too) and the share of the rise (pruned - unpruned) the repair removes. Writes
``repair_sweep_<name>.{md,csv,png}``; everything is measured in this one run, on one loaded model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _models import held_out_tests, model_argument, write_tables

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import repair_samples
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.repair.least_squares import fit_repair


def parse_states(text: str) -> dict[str, list[int]]:
    """`"cbo=13,14;bi=3,4"` → `{"cbo": [13, 14], "bi": [3, 4]}`."""
    states = {}
    for part in filter(None, text.split(";")):
        name, blocks = part.split("=")
        states[name.strip()] = [int(b) for b in blocks.split(",")]
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--states", required=True, help='name=blocks separated by ";", e.g. "cbo=13,14,15,16,17,18"')
    parser.add_argument("--ridges", default="0.3", help="comma-separated ridges (the config's repair_ridge)")
    parser.add_argument(
        "--depths", default="0", help="comma-separated refit depths after each gap (the config's repair_depth)"
    )
    parser.add_argument(
        "--fits",
        default="default",
        help='data choices separated by ";": default (the config\'s default fit data) or a repair_data value, '
        'e.g. "embedded;default" (the novel alone against the default, the novel and the embedded play)',
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=16, help="test windows per held-out domain")
    parser.add_argument("--repair-samples", type=int, default=BlockRemovalConfig.repair_samples)
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument(
        "--gsm8k", action="store_true", help="test on GSM8K chat records too (a third domain no fit data holds)"
    )
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", default=None, help="file stem after repair_sweep_ (default: model and M)")
    args = parser.parse_args()
    states = parse_states(args.states)
    ridges = [float(r) for r in args.ridges.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    fits = [f.strip() for f in args.fits.split(";") if f.strip()]
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    tests = held_out_tests(tokenizer, args.eval_dir, args.eval_samples, args.seq_len, extra=args.gsm8k)
    unpruned = {label: perplexity(model, test) for label, test in tests.items()}
    print("unpruned", json.dumps(unpruned), flush=True)
    base = BlockRemovalConfig(model=model_arg, seq_len=args.seq_len, repair_samples=args.repair_samples)
    samples = {
        fit: repair_samples(tokenizer, base.replace(repair_data=None if fit == "default" else fit)) for fit in fits
    }
    rows = []
    for name, blocks in states.items():
        pruned = {label: perplexity(model, test, blocks) for label, test in tests.items()}
        for fit in fits:
            for ridge, depth in [(r, d) for r in ridges for d in depths]:
                settings = base.replace(repair_ridge=ridge, repair_depth=depth).repair_settings
                began = time.perf_counter()
                repair = fit_repair(model, blocks, samples[fit], settings, base.batch_size)
                row = {"state": name, "blocks": blocks, "fit": fit, "ridge": ridge, "depth": depth}
                row["kind"] = repair.kind
                row["repair_s"] = round(time.perf_counter() - began, 1)
                with repair.applied(model):
                    for label, test in tests.items():
                        repaired = perplexity(model, test, blocks)
                        rise = pruned[label] - unpruned[label]
                        row[f"{label} pruned"] = pruned[label]
                        row[f"{label} repaired"] = repaired
                        row[f"{label} removed"] = (pruned[label] - repaired) / rise if rise > 0 else float("nan")
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"repair_sweep_{args.name or f'{args.model}_m{len(next(iter(states.values())))}'}"
    labels = list(tests)
    lines = [
        f"unpruned: {', '.join(f'{k} {v:.2f}' for k, v in unpruned.items())}",
        "",
        "| state | blocks | fit data | ridge | depth | map | "
        + " | ".join(f"{label} pruned → repaired | rise removed" for label in labels)
        + " | repair s |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in labels) + " | --- |",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r[f'{label} pruned']:.2f} → {r[f'{label} repaired']:.2f} | {100 * r[f'{label} removed']:.0f} %"
            for label in labels
        )
        lines.append(
            f"| {r['state']} | {r['blocks']} | {r['fit']} | {r['ridge']:g} | {r['depth']} | {r['kind']} | {cells} | "
            f"{r['repair_s']} |"
        )
    write_tables(out, stem, lines, rows)
    plot(out / f"{stem}.png", rows, labels)


def plot(path: Path, rows: list[dict], labels: list[str]) -> None:
    """Share of the rise removed against the ridge (or, with one ridge, the depth): one panel per domain, a line per
    state and remaining setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    if len({r["ridge"] for r in rows}) == 1 and len({r["depth"] for r in rows}) == 1:
        plot_fits(path, rows, labels, plt)
        return
    x = "ridge" if len({r["ridge"] for r in rows}) > 1 else "depth"
    rest = [k for k in ("fit", "depth" if x == "ridge" else "ridge") if len({r[k] for r in rows}) > 1]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), sharey=True)
    for ax, label in zip(axes, labels, strict=True):
        for key in dict.fromkeys((r["state"], *(r[k] for k in rest)) for r in rows):
            line = [r for r in rows if (r["state"], *(r[k] for k in rest)) == key]
            name = ", ".join([key[0], *(f"{k} {v}" for k, v in zip(rest, key[1:], strict=True))])
            ax.plot([r[x] for r in line], [100 * r[f"{label} removed"] for r in line], "o-", label=name)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        if x == "ridge":
            ax.set_xscale("log")
        ax.set_xlabel("ridge (towards no repair)" if x == "ridge" else "kept blocks refitted after each gap")
        ax.set_title(label)
    axes[0].set_ylabel("share of the perplexity rise removed (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_fits(path: Path, rows: list[dict], labels: list[str], plt) -> None:
    """One ridge and one depth: the share removed per state as bars, one bar per fit data, one panel per domain."""
    states = list(dict.fromkeys(r["state"] for r in rows))
    fits = list(dict.fromkeys(r["fit"] for r in rows))
    width = 0.8 / len(fits)
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), sharey=True)
    for ax, label in zip(axes, labels, strict=True):
        for k, fit in enumerate(fits):
            shares = [
                100 * next((r[f"{label} removed"] for r in rows if r["state"] == s and r["fit"] == fit), float("nan"))
                for s in states
            ]
            ax.bar([i + (k - (len(fits) - 1) / 2) * width for i in range(len(states))], shares, width, label=fit)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(states)), states)
        ax.set_title(label)
    axes[0].set_ylabel("share of the perplexity rise removed (%)")
    handles, names = axes[0].get_legend_handles_labels()  # below the panels, clear of the bars
    fig.legend(handles, names, title="repair fitted on", fontsize=7, loc="lower center", ncol=len(fits))
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
