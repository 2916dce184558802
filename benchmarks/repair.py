"""Training-free repair side by side: every selection method unrepaired vs repaired, CBO repair-aware, distillation.

    python benchmarks/repair.py --model smollm2 --remove 6 --eval-dir eval_data --output docs/results
    python benchmarks/repair.py --model gemma3 --remove 4 --heal-steps 0 --eval-dir eval_data --output docs/results

(`eval_data` from `python examples/offline_eval_data.py --output eval_data`.) For each method: the blocks it removes,
held-out test perplexity on two domains (Austen's Persuasion, Shakespeare's As You Like It) before and after the
repair, the share of the perplexity increase the repair removes, and the repair's wall time. With ``--heal-steps``:
the CBO choice distilled for that many steps unrepaired, against repaired + ``--heal-short`` steps. Writes
``repair_<name>.md``, ``.csv`` and ``.png`` into ``--output``; everything is measured in this one run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _models import held_out_tests, model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import repair_samples
from hf_blockcbo.evaluation.likelihood import paired_ratio_interval, perplexity, window_losses
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import Selection, calibrate, choose_blocks, prune_and_save
from hf_blockcbo.repair.least_squares import fit_repair, kind_before_training
from hf_blockcbo.selection.scorers import ScoringContext, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--methods", default="bi,angular,norm_ratio,sleb")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=16, help="test windows per held-out domain")
    parser.add_argument(
        "--validation-samples", type=int, default=64, help="validation windows for selection (the README's)"
    )
    parser.add_argument("--repair-samples", type=int, default=BlockRemovalConfig.repair_samples)
    parser.add_argument("--measured-samples", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--ridge", type=float, default=None, help="default: the config's repair_ridge")
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="kept blocks refitted after each gap (default: the config's repair_depth)",
    )
    parser.add_argument(
        "--weighting", default=None, help="the repair's token weighting (default: the config's repair_weighting)"
    )
    parser.add_argument(
        "--kind", default=None, help="the repair map's form (default: the config's repair_kind, auto: the family's)"
    )
    parser.add_argument(
        "--repair-data",
        default=None,
        help="the config's repair_data: fit the repairs on these sources instead of the calibration data "
        "(comma-separated, sharing the windows evenly), e.g. embedded,eval_data/shakespeare_twelfth_night.txt",
    )
    parser.add_argument(
        "--also-weighting",
        default=None,
        help="fit every method's repair a second time with this weighting (e.g. uniform) and add its columns",
    )
    parser.add_argument(
        "--also-kind",
        default=None,
        help="fit every method's repair a second time with this map form where the family folds it (e.g. diagonal "
        "on Gemma) and add its columns",
    )
    parser.add_argument("--heal-steps", type=int, default=300, help="0: no distillation rows")
    parser.add_argument(
        "--heal-short",
        default="100",
        help="steps of the short arms, comma-separated (e.g. 100,150,200: how many steps the repaired start needs)",
    )
    parser.add_argument(
        "--short-arm-only",
        action="store_true",
        help="distil only the repaired + short arm (compare with the long arm of an earlier run of the same settings)",
    )
    parser.add_argument(
        "--also-short-unrepaired",
        action="store_true",
        help="also distil the unrepaired choice for each --heal-short: what the repair adds at equal steps",
    )
    parser.add_argument("--heal-lr", type=float, default=1e-4, help="learning rate of both distillation arms")
    parser.add_argument(
        "--heal-data",
        default=None,
        help="distil every arm on these sources instead of the calibration text (comma-separated; `embedded` is "
        "the calibration novel): each shorter source's text is repeated to the longest's length, so every source "
        "holds an equal share of the training text, e.g. embedded,eval_data/shakespeare_twelfth_night.txt",
    )
    parser.add_argument(
        "--heal-short-lr",
        help="learning rates of the repaired + short arm, comma-separated, one arm each (default: --heal-lr)",
    )
    parser.add_argument(
        "--cbo-blocks",
        help="the CBO choice of an earlier run of this script (e.g. 7,8,9,12): skip the calibration and both CBO "
        "selections, measure and distil these blocks",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="the config's data: calibrate, score the baselines and (unless --repair-data) fit the repairs on these "
        "sources instead of the embedded novel, e.g. eval_data/gsm8k_fit_text.jsonl (a user's own domain)",
    )
    parser.add_argument(
        "--validation-data",
        default=None,
        help="the config's validation_data: select among the top-k on these sources (default: the novel's "
        "validation split), e.g. eval_data/gsm8k_validation_text.jsonl",
    )
    parser.add_argument(
        "--gsm8k", action="store_true", help="test on GSM8K chat records too (`eval_data/gsm8k_chat.jsonl`)"
    )
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results")
    args = parser.parse_args()
    if args.also_weighting and args.also_kind:
        parser.error("give --also-weighting or --also-kind, not both")
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    config = BlockRemovalConfig(
        model=model_arg,
        num_remove=args.remove,
        seq_len=args.seq_len,
        num_samples=64,
        measured_samples=args.measured_samples,
        top_k=args.top_k,
        validation_samples=args.validation_samples,
        repair_samples=args.repair_samples,
    )
    if args.ridge is not None:
        config.repair_ridge = args.ridge
    if args.depth is not None:
        config.repair_depth = args.depth
    if args.weighting is not None:
        config.repair_weighting = args.weighting
    if args.kind is not None:
        config.repair_kind = args.kind
    if args.repair_data is not None:
        config.repair_data = args.repair_data
    if args.data is not None or args.validation_data is not None:  # checked like any face's data settings
        config = config.replace(data=args.data, validation_data=args.validation_data)
    eval_dir = Path(args.eval_dir)
    # the held-out windows every benchmark tests on (`_models.held_out_tests`), under this script's short labels
    short = {
        "Austen (Persuasion)": "Persuasion",
        "Shakespeare (As You Like It)": "Shakespeare",
        "GSM8K (chat)": "GSM8K",
    }
    tests = {
        short[label]: test
        for label, test in held_out_tests(
            tokenizer, eval_dir, args.eval_samples, args.seq_len, extra=args.gsm8k
        ).items()
    }
    unpruned = {k: perplexity(model, v) for k, v in tests.items()}
    print("unpruned", unpruned, flush=True)
    data = repair_samples(tokenizer, config)
    rows = []

    def measure(method, blocks, seconds, note=""):
        row = {"method": method, "blocks": list(blocks), "choose_s": seconds, "note": note}
        for label, test in tests.items():
            row[label] = perplexity(model, test, blocks)
        settings = config.repair_settings
        arms = [("", settings)]
        if args.also_weighting:
            arms.append((f" {args.also_weighting}", dataclasses.replace(settings, weighting=args.also_weighting)))
        if args.also_kind:
            arms.append((f" {args.also_kind}", dataclasses.replace(settings, kind=args.also_kind)))
        for suffix, arm in arms:  # the same blocks repaired each way: seconds, perplexities, share
            began = time.perf_counter()
            repair = fit_repair(model, blocks, data, arm, config.batch_size)
            row[f"kind{suffix}"] = repair.kind
            row[f"repair_s{suffix}"] = time.perf_counter() - began
            with repair.applied(model):
                for label, test in tests.items():
                    repaired = row[f"{label} repaired{suffix}"] = perplexity(model, test, blocks)
                    rise = row[label] - unpruned[label]
                    row[f"{label} removed{suffix}"] = (row[label] - repaired) / rise if rise > 0 else float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.cbo_blocks:
        blocks = [int(b) for b in args.cbo_blocks.split(",")]
        plain = Selection(blocks, "given (--cbo-blocks: an earlier run's CBO choice)")
        measure("cbo (given)", plain.blocks, 0.0, plain.how)
    else:
        began = time.perf_counter()
        artifact = calibrate(model, tokenizer, config, source, progress=False)
        calibrate_s = time.perf_counter() - began
        began = time.perf_counter()
        plain, _ = choose_blocks(model, tokenizer, config, source, artifact, progress=False)
        measure("cbo", plain.blocks, calibrate_s + time.perf_counter() - began, plain.how)
        began = time.perf_counter()
        aware_config = config.replace(repair=True, repair_aware=True)
        aware, _ = choose_blocks(model, tokenizer, aware_config, source, artifact, progress=False)
        measure("cbo (repair-aware)", aware.blocks, calibrate_s + time.perf_counter() - began, aware.how)
    ctx = ScoringContext.from_config(model, tokenizer, config, None, sleb_samples=8)
    for method in [m for m in args.methods.split(",") if m]:
        began = time.perf_counter()
        chosen = score(method, ctx, args.remove)[0]
        measure(method, chosen.blocks, time.perf_counter() - began)

    heal_rows = []
    if args.heal_steps:
        heal_rows = distill(args, model, tokenizer, source, config, plain, tests, unpruned)
    write(args, rows, heal_rows, unpruned, tests)


def distill(args, model, tokenizer, source, config, selection, tests, unpruned) -> list[dict]:
    """The CBO choice: distilled `heal_steps` unrepaired vs repaired + distilled `heal_short` steps, the repair in
    the form `prune --repair --heal` fits (`auto`: the family's start for training)."""
    from transformers import AutoModelForCausalLM

    from hf_blockcbo.healing.trainer import HealConfig, heal

    # the form `prune --repair --heal` fits: `auto` is the family's start for training
    heal_config = config.replace(repair_kind=kind_before_training(model, config.repair_kind))
    work = Path(tempfile.mkdtemp(prefix="repair_bench_"))
    heal_data = balanced_text(args.heal_data, work / "heal_data.jsonl") if args.heal_data else None
    teacher = config.model or "embedded:smollm2"  # the unpruned model the student came from
    out = []
    long_arm = None  # the long arm's per-window test losses, once measured
    try:
        short_lrs = [float(x) for x in args.heal_short_lr.split(",")] if args.heal_short_lr else [args.heal_lr]
        arms = [] if args.short_arm_only else [("distilled", False, args.heal_steps, args.heal_lr)]
        for short in short_steps(args):
            if args.also_short_unrepaired:
                arms.append(("distilled", False, short, args.heal_lr))
            arms += [("repaired + distilled", True, short, lr) for lr in short_lrs]
        for arm, (label, repaired, steps, lr) in enumerate(arms):  # one folder per arm: two rates, two students
            student = work / f"student_{arm}"
            began = time.perf_counter()
            summary = prune_and_save(
                copy.deepcopy(model), tokenizer, selection, student, source, heal_config.replace(repair=repaired)
            )
            if repaired:  # the form fitted, in the row's name (and whether the validation check folded it)
                record = summary.get("repair") or summary["repair_rejected"]
                depth = record.get("depth")
                form = record["kind"] + (f", depth {depth}" if depth else "")
                form += ", not folded: the validation check rejected it" if summary.get("repair_rejected") else ""
                label = label.replace("repaired", f"repaired ({form})")
            prepare_s = time.perf_counter() - began
            heal_args = HealConfig(
                output_dir=str(work / "ckpt"),
                max_steps=steps,
                learning_rate=lr,
                per_device_train_batch_size=2,
                max_length=args.seq_len,
                save_steps=10**6,
                warmup_steps=max(1, steps // 10),
            )
            began = time.perf_counter()
            heal(student, teacher, heal_data, work / f"healed_{arm}", heal_args, eval_samples=8)
            heal_s = time.perf_counter() - began
            healed = AutoModelForCausalLM.from_pretrained(work / f"healed_{arm}").eval()
            row = {
                "method": f"cbo {label} ({steps} steps, lr {lr:g})",
                "steps": steps,
                "repaired": repaired,
                "prepare_s": prepare_s,
                "heal_s": heal_s,
            }
            losses = {name: window_losses(healed, test) for name, test in tests.items()}
            for name, loss in losses.items():
                row[name] = loss.perplexity
                if long_arm is not None:  # against the long arm, paired over the same test windows
                    ratio, low, high = paired_ratio_interval(loss.nll, long_arm[name].nll, loss.tokens)
                    row[f"{name} / long arm"], row[f"{name} low"], row[f"{name} high"] = ratio, low, high
            if arm == 0 and not args.short_arm_only:
                long_arm = losses
            out.append(row)
            print(json.dumps(row), flush=True)
            del healed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def balanced_text(sources: str, path: Path) -> str:
    """A JSONL file of text records holding every source of ``sources`` (comma-separated; ``embedded``: the
    calibration novel) in equal shares: each source's whole text is one record, repeated until the source is as long
    as the longest (distillation cuts records into paragraph-sized samples, so none mixes two sources). Returns its
    path, for `heal`'s ``data``."""
    from hf_blockcbo.data import load_records

    texts = []
    for source in filter(None, (s.strip() for s in sources.split(","))):
        records, _ = load_records(source)  # `embedded` or a text file: one record of its whole text
        texts.append("\n\n".join(r["text"] for r in records))
    longest = max(len(text) for text in texts)
    with path.open("w", encoding="utf-8") as out:
        for text in texts:
            for _ in range(round(longest / len(text))):
                out.write(json.dumps({"text": text}) + "\n")
    return str(path)


def short_steps(args) -> list[int]:
    """The short arms' step counts (``--heal-short``), in order."""
    return [int(x) for x in args.heal_short.split(",") if x]


def write(args, rows, heal_rows, unpruned, tests) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    also = args.also_weighting or args.also_kind
    name = f"repair_{args.model}_m{args.remove}" + (f"_{also}" if also else "")
    if args.data:
        name += "_data_" + "+".join(Path(s).stem for s in args.data.split(",") if s)
    if args.repair_data:
        name += "_fit_" + "+".join(Path(s).stem for s in args.repair_data.split(",") if s)
    if args.heal_short_lr:
        name += "_short_lr_" + args.heal_short_lr.replace(",", "_")
    if args.kind is not None:
        name += f"_kind_{args.kind}"
    if args.ridge is not None:
        name += f"_ridge_{args.ridge:g}"
    if args.depth is not None:
        name += f"_depth_{args.depth}"
    if args.repair_samples != BlockRemovalConfig.repair_samples:
        name += f"_repair_samples_{args.repair_samples}"
    if args.heal_data and args.heal_steps:
        name += "_heal_" + "+".join(Path(s).stem for s in args.heal_data.split(",") if s)
    if args.short_arm_only and args.heal_steps:
        name += "_short_arm"
    if len(short_steps(args)) > 1 and args.heal_steps:
        name += "_steps_" + "_".join(map(str, short_steps(args)))
    labels = list(tests)
    lines = [
        f"# Training-free repair: {args.model}, M = {args.remove}",
        "",
        f"Command: `python benchmarks/repair.py {shlex.join(sys.argv[1:])}`",
        "",
        "Unpruned test perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in unpruned.items()) + ".",
        "",
    ]
    weighting = args.weighting or BlockRemovalConfig().repair_weighting
    if args.also_weighting:
        lines += [
            f"Repaired: {weighting} token weights; the `{also}` columns refit the same blocks with {also} ones.",
            "",
        ]
    elif also:
        kind = rows[0].get("kind", "the family's")
        lines += [f"Repaired: `{kind}` maps; the `{also}` columns refit the same blocks with `{also}` maps.", ""]
    lines += [
        "| method | blocks | "
        + " | ".join(
            f"{k} pruned | {k} repaired | {k} rise removed"
            + (f" | {k} repaired, {also} | removed, {also}" if also else "")
            for k in labels
        )
        + " | repair s |",
        "| --- | --- | "
        + " | ".join("--- | --- | ---" + (" | --- | ---" if also else "") for _ in labels)
        + " | --- |",
    ]
    best = {k: min(r[f"{k} repaired"] for r in rows) for k in labels}
    for r in rows:
        cells = []
        for k in labels:
            rep = f"{r[f'{k} repaired']:.2f}"
            cells.append(
                f"{r[k]:.2f} | {'**' + rep + '**' if r[f'{k} repaired'] == best[k] else rep} | "
                f"{100 * r[f'{k} removed']:.0f} %"
                + (f" | {r[f'{k} repaired {also}']:.2f} | {100 * r[f'{k} removed {also}']:.0f} %" if also else "")
            )
        lines.append(f"| {r['method']} | {r['blocks']} | " + " | ".join(cells) + f" | {r['repair_s']:.1f} |")
    if heal_rows:
        paired = any(f"{k} / long arm" in h for h in heal_rows for k in labels)
        ratio_head = "".join(f" {k} / long arm (95 % paired interval) |" for k in labels) if paired else ""
        lines += ["", "| CBO choice, then | " + " | ".join(labels) + f" |{ratio_head} wall s |"]
        lines.append("| --- |" + " --- |" * (len(labels) * (2 if paired else 1) + 1))
        for h in heal_rows:
            wall = h["prepare_s"] + h["heal_s"]
            ratios = ""
            if paired:
                ratios = "".join(
                    f" {h[f'{k} / long arm']:.3f} ({h[f'{k} low']:.3f}–{h[f'{k} high']:.3f}) |"
                    if f"{k} / long arm" in h
                    else " |"
                    for k in labels
                )
            lines.append(
                f"| {h['method']} | " + " | ".join(f"{h[k]:.2f}" for k in labels) + f" |{ratios} {wall:.0f} |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    one_row_per_point = len({(h["steps"], h["repaired"]) for h in heal_rows}) == len(heal_rows)  # one rate
    if len({h["steps"] for h in heal_rows}) > 2 and one_row_per_point:  # a curve over steps, one per start
        plot_steps(out / f"{name}_steps.png", args, heal_rows, labels)
    with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows + heal_rows for k in r}))
        writer.writeheader()
        for r in rows + heal_rows:
            writer.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4.2))
    for ax, k in zip(axes, labels, strict=True):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r[k] for r in rows], 0.4, label="pruned")
        ax.bar([i + 0.2 for i in x], [r[f"{k} repaired"] for r in rows], 0.4, label="pruned + repair")
        ax.axhline(unpruned[k], color="grey", ls=":", label="unpruned")
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["method"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"test perplexity, {k}")
        ax.set_title(f"{args.model}, M = {args.remove}: {k}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


def plot_steps(path: Path, args, heal_rows, labels) -> None:
    """Test perplexity against distillation steps, repaired and unrepaired, with the long arm as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    long = None if args.short_arm_only else heal_rows[0]  # distill() runs the long arm first
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4))
    for ax, k in zip(axes, labels, strict=True):
        if long is not None:
            ax.axhline(long[k], color="grey", ls=":", label=f"{long['steps']} steps, unrepaired")
        for repaired, style in ((False, "o--"), (True, "s-")):
            arm = sorted((h["steps"], h[k]) for h in heal_rows if h["repaired"] == repaired)
            if arm:
                ax.plot(*zip(*arm, strict=True), style, label="repaired start" if repaired else "unrepaired start")
        ax.set_xlabel("distillation steps")
        ax.set_ylabel(f"test perplexity, {k}")
        ax.set_title(f"{args.model}, M = {args.remove}: {k}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
