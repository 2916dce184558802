"""Harness scores and measured speed of CBO-pruned models at several M, side by side in one run.

    python benchmarks/eval_speed.py --model smollm2 --removes 2,4,6,8 --eval-dir eval_data --output docs/results
    python benchmarks/eval_speed.py --model gemma3 --removes 2,4,6 --limit 100 --eval-dir eval_data --output docs/results

(`eval_data` from `python examples/offline_eval_data.py --output eval_data`.) The blocks are chosen exactly as the
README's main command chooses them (`hf-blockcbo prune --remove M --seq-len 128 --top-k 8 --validation-samples 64`,
one measured Hessian for every M). Harness scores (lm-evaluation-harness, local task files, the first ``--limit``
items) are taken on the gated model; speed on a physically pruned copy against the original, interleaved, median of
``--repeats`` runs. Writes ``eval_speed_<name>.md``, ``.csv`` and ``.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch
from _models import blocks_at, model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.evaluation.harness import evaluate_tasks
from hf_blockcbo.evaluation.speed import benchmark
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import calibrate, choose_blocks
from hf_blockcbo.surgery.removal import remove_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--removes", default="2,4,6,8")
    parser.add_argument("--tasks", default="hellaswag,arc_challenge,boolq", help="files <name>.jsonl in --eval-dir")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch-sizes", default="1,8", help="decode batches measured (the first is the one the goal column judges)"
    )
    parser.add_argument(
        "--blocks", default="", help='blocks per M instead of choosing them, e.g. "6=13,14,15,16,17,18;2=4,17"'
    )
    parser.add_argument(
        "--validation-samples", type=int, default=64, help="validation windows for choosing the blocks (the README's)"
    )
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    config = BlockRemovalConfig(model=model_arg, seq_len=128, top_k=8, validation_samples=args.validation_samples)
    tasks = [str(Path(args.eval_dir) / f"{t}.jsonl") for t in args.tasks.split(",") if t]
    given = dict(blocks_at(item) for item in args.blocks.split(";") if item)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    removes = [int(x) for x in args.removes.split(",")]
    artifact = None
    if any(m not in given for m in removes):
        began = time.perf_counter()
        artifact = calibrate(model, tokenizer, config, source, progress=False)
        print(f"measured Hessian: {time.perf_counter() - began:.0f} s", flush=True)

    def scores(removed=()):
        if not tasks:
            return {}
        began = time.perf_counter()
        out = evaluate_tasks(model, tokenizer, tasks, removed=removed, limit=args.limit, batch_size=8)
        print(f"  harness {time.perf_counter() - began:.0f} s", flush=True)
        return out

    rows = [{"M": 0, "blocks": [], "scores": scores(), "speed": None}]
    print(json.dumps(rows[-1]), flush=True)
    for m in removes:
        if m in given:
            blocks = given[m]
        else:
            config_m = config.replace(num_remove=m)
            blocks = choose_blocks(model, tokenizer, config_m, source, artifact, progress=False)[0].blocks
        pruned = remove_blocks(copy.deepcopy(model), blocks)
        speed = {}
        for batch in batch_sizes:
            report = benchmark(
                {"original": model, "pruned": pruned},
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                batch_size=batch,
                repeats=args.repeats,
            )
            speed[batch] = report.to_dict()
            print(report.markdown(), flush=True)
        del pruned
        rows.append({"M": m, "blocks": blocks, "scores": scores(blocks), "speed": speed})
        print(json.dumps(rows[-1]), flush=True)
    write(args, rows, config, batch_sizes)


def _speed_up(row: dict, metric: str) -> str:
    low, high = row[f"{metric}_tokens_per_s_ratio_spread"]
    return f"{row[f'{metric}_tokens_per_s_ratio']:.3f}× ({low:.2f}–{high:.2f})"


def write(args, rows, config, batch_sizes) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"eval_speed_{args.model}"
    tasks = list(rows[0]["scores"])
    first = batch_sizes[0]
    chosen = (
        "given with --blocks"
        if args.blocks
        else f"chosen as the README's main command chooses them (measured Hessian, validation selection over "
        f"{config.top_k} states)"
    )
    harness = (
        f" lm-evaluation-harness accuracy (acc / acc_norm) on the first {args.limit} items of local task files;"
        if tasks
        else ""
    )
    lines = [
        f"# Harness scores and measured speed: {args.model}",
        "",
        f"Command: `python benchmarks/eval_speed.py --model {args.model} --removes {args.removes}"
        + (f" --limit {args.limit}" if tasks else "")
        + f" --batch-sizes {args.batch_sizes} --repeats {args.repeats}"
        + (f' --blocks "{args.blocks}"' if args.blocks else "")
        + (f' --tasks "{args.tasks}"' if args.tasks != "hellaswag,arc_challenge,boolq" else "")
        + f" --eval-dir eval_data`. Blocks {chosen}.{harness} {'speed' if tasks else 'Speed'} of the physically "
        "pruned model vs the original, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} greedy decode steps with the KV cache (prefill computes "
        f"the LM head for the last position only, as `generate` does), {args.repeats} interleaved runs per batch "
        f"size ({args.batch_sizes}) after a warm-up; a speed-up is the median of the ratios of runs measured back to "
        "back.",
        "",
        "| M | blocks removed | "
        + "".join(f"{t} acc / acc_norm | " for t in tasks)
        + "".join(f"prefill speed-up b={b} | decode speed-up b={b} | " for b in batch_sizes)
        + f"ideal N/(N−M) | decode b={first} ≥ 0.9 × ideal | KV cache MB (b={first}) |",
        "| --- | --- | " + "--- | " * (len(tasks) + 2 * len(batch_sizes) + 3),
    ]
    csv_rows = []
    for r in rows:
        cells = [f"{r['scores'][t]['acc']:.3f} / {r['scores'][t].get('acc_norm', float('nan')):.3f}" for t in tasks]
        flat = {"M": r["M"], "blocks": " ".join(map(str, r["blocks"]))}
        for t in tasks:
            flat[f"{t}_acc"] = r["scores"][t]["acc"]
            flat[f"{t}_acc_norm"] = r["scores"][t].get("acc_norm")
        if r["speed"] is None:
            speed_cells = [""] * (2 * len(batch_sizes) + 3)
        else:
            speed_cells = []
            for b in batch_sizes:
                pruned = r["speed"][b]["models"]["pruned"]
                speed_cells += [_speed_up(pruned, "prefill"), _speed_up(pruned, "decode")]
                flat[f"prefill_speedup_b{b}"] = pruned["prefill_tokens_per_s_ratio"]
                flat[f"decode_speedup_b{b}"] = pruned["decode_tokens_per_s_ratio"]
            original, pruned = r["speed"][first]["models"]["original"], r["speed"][first]["models"]["pruned"]
            ideal = original["layers"] / pruned["layers"]
            decode = pruned["decode_tokens_per_s_ratio"]
            flat["ideal"] = ideal
            speed_cells += [
                f"{ideal:.3f}×",
                "yes" if decode >= 0.9 * ideal else f"no ({decode / ideal:.3f} of ideal)",
                f"{original['kv_cache_bytes'] / 2**20:.2f} → {pruned['kv_cache_bytes'] / 2**20:.2f}",
            ]
        lines.append(f"| {r['M']} | {r['blocks']} | " + " | ".join(cells + speed_cells) + " |")
        csv_rows.append(flat)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in csv_rows for k in r}))
        writer.writeheader()
        writer.writerows(csv_rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ms = [r["M"] for r in rows]
    for t in tasks:
        left.plot(ms, [r["scores"][t]["acc"] for r in rows], "o-", label=t)
    left.set_xlabel("blocks removed (M)")
    left.set_ylabel("harness accuracy")
    if tasks:
        left.legend(fontsize=7)
    left.set_title(f"{args.model}: accuracy vs M")
    timed = [r for r in rows if r["speed"]]
    for b, marker in zip(batch_sizes, "osd^v", strict=False):
        for metric, style in (("decode", "-"), ("prefill", "--")):
            right.plot(
                [r["M"] for r in timed],
                [r["speed"][b]["models"]["pruned"][f"{metric}_tokens_per_s_ratio"] for r in timed],
                marker + style,
                label=f"{metric}, batch {b} (measured)",
            )
    layers = [r["speed"][first]["models"] for r in timed]
    right.plot(
        [r["M"] for r in timed],
        [x["original"]["layers"] / x["pruned"]["layers"] for x in layers],
        "k:",
        label="ideal N/(N−M)",
    )
    right.set_xlabel("blocks removed (M)")
    right.set_ylabel("speed-up over the original")
    right.legend(fontsize=7)
    right.set_title(f"{args.model}: measured speed-up")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
