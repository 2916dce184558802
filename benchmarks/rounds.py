"""Do rounds (re-expanding the measured damage around the ground state) improve CBO's choice? Side by side in one run:
CBO-measured with 0, 1 and up to ``--max-rounds`` rounds, and with the library's defaults for rounds (as ``prune``
runs them, trigger included), against BI, angular, norm ratio and SLEB, test perplexity on
two held-out domains, predicted vs measured calibration KL, bootstrap stability and each method's cost.

    python examples/offline_eval_data.py --output eval_data
    python benchmarks/rounds.py --model smollm2 --removes 2,4,6,8 --eval-dir eval_data --output docs/results

Writes ``rounds_<name>.md`` and ``.csv`` into ``--output``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
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
from hf_blockcbo.selection.rounds import ROUND_SWAPS, refine_by_rounds, solve_with_rounds
from hf_blockcbo.selection.scorers import ScoringContext, score
from hf_blockcbo.selection.validation import spearman
from hf_blockcbo.solvers.dispatch import solve_artifact, solve_artifact_near


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or any --model value of hf-blockcbo")
    parser.add_argument("--removes", default="2,4,6,8")
    parser.add_argument("--max-rounds", type=int, default=2)
    parser.add_argument(
        "--swaps", type=int, default=ROUND_SWAPS, help="a round's trust region (1: only swaps measured, all exact)"
    )
    parser.add_argument("--round-removes", help="the M with rounds (default: every M above 2 in --removes)")
    parser.add_argument("--baselines", default="bi,angular,norm_ratio,sleb")
    parser.add_argument(
        "--states",
        default="",
        help="fixed states evaluated beside, e.g. 'sleb (estimators run)@6=7,8,9,14,15,17;...' (a baseline's known pick)",
    )
    parser.add_argument("--measured-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=16, help="validation / test samples per set")
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--eval-dir", default="eval_data")
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", help="file stem (default: --model)")
    parser.add_argument(
        "--artifact", help="save the first pass here, or reuse it if the file exists (same model and settings)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    removes = [int(m) for m in args.removes.split(",")]
    rounds_at = (
        [int(m) for m in args.round_removes.split(",")] if args.round_removes else [m for m in removes if m > 2]
    )
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    name = args.name or args.model
    base = BlockRemovalConfig(
        model=model_arg,
        num_samples=max(args.measured_samples, 8),
        seq_len=args.seq_len,
        top_k=args.top_k,
        measured_samples=args.measured_samples,
        validation_samples=args.eval_samples,
    )
    eval_dir = Path(args.eval_dir)
    validation = validation_samples(tokenizer, base)
    tests = held_out_tests(tokenizer, eval_dir, args.eval_samples, args.seq_len)
    calibration = calibration_samples(tokenizer, base)
    count = min(len(calibration), args.measured_samples)
    cal = CalibrationSet(calibration.input_ids[:count], calibration.attention_mask[:count], calibration.source)
    rows, notes = [], []

    def evaluate(method, m, blocks, how, seconds, tokens):
        out = {"model": name, "M": m, "method": method, "blocks": list(blocks), "how": how}
        out["seconds"], out["tokens"] = round(seconds, 1), tokens
        for label, data in tests.items():
            out[label] = measure_states(model, [blocks], data, batch_size=8).perplexity[0]
        out["calibration KL"] = measure_states(model, [blocks], cal, batch_size=8).kl[0]
        rows.append(out)
        print(f"  M={m} {method:24s} {list(blocks)} " + " ".join(f"{out[k]:.2f}" for k in tests), flush=True)

    unpruned = {label: measure_states(model, [(0,)], data).unpruned_perplexity for label, data in tests.items()}
    began = time.perf_counter()
    cached = Path(args.artifact) if args.artifact else None
    if cached is not None and cached.exists():  # a first pass saved by an earlier run with the same settings
        artifact = HessianArtifact.load(cached)
        first_seconds = float(artifact.metadata["first_pass_seconds"])
    else:
        artifact = calibrate(model, tokenizer, base, source, progress=True, calibration=calibration)
        first_seconds = time.perf_counter() - began
        artifact.metadata["first_pass_seconds"] = f"{first_seconds:.1f}"
        if cached is not None:
            artifact.save(cached)
    first_tokens = int(artifact.metadata["measured_tokens"])
    print(f"first pass: {first_seconds:.1f} s, {first_tokens:,} tokens", flush=True)

    def select(cands):
        val = measure_states(model, [c.blocks for c in cands], validation).perplexity
        best = min(range(len(cands)), key=lambda i: (val[i], i))
        return cands[best], best

    for m in removes:
        config = base.replace(num_remove=m, measured_rounds=args.max_rounds)
        result = solve_artifact(artifact, config)
        chosen, best = select(result.candidates)
        evaluate("cbo, 0 rounds", m, chosen.blocks, f"state {best}", first_seconds, first_tokens)
        # the pipeline's own path with the library's defaults for rounds (trigger included), as `prune` runs it
        defaults, records = solve_with_rounds(model, artifact, base.replace(num_remove=m), lambda: calibration)
        chosen, best = select(defaults.candidates)
        records = records or []
        ran = [r for r in records if r["round"] > 0]
        seconds = first_seconds + sum(r["seconds"] for r in records)
        tokens = first_tokens + sum(r["tokens"] for r in records)
        how = f"state {best}, {len(ran)} round(s)"
        evaluate("cbo, library defaults", m, chosen.blocks, how, seconds, tokens)
        check = records[0]  # the trigger's check already measured the first pass's ground state
        notes.append(
            f"M = {m}: first pass, predicted vs measured calibration KL of its ground state {check['state']}: "
            f"{check['predicted']:.4f} / {check['measured']:.4f} (relative error {check['miss']:.1%})."
        )
        print(notes[-1], flush=True)
        seconds, tokens = first_seconds, first_tokens
        expansions = []
        for r in range(1, args.max_rounds + 1 if m in rounds_at else 1):
            t0 = time.perf_counter()
            one = config.replace(measured_rounds=1)
            refined, records = refine_by_rounds(
                model, artifact, one, cal, result, expansions=expansions, swaps=args.swaps
            )
            seconds += time.perf_counter() - t0
            tokens += records[0]["tokens"]
            moved = list(refined.candidates[0].blocks) != list(result.candidates[0].blocks)
            result = refined
            chosen, best = select(result.candidates)
            # a round that did not move the ground state ends the rounds: later rows repeat this one at no cost
            evaluate(f"cbo, {r} round{'s' * (r > 1)}", m, chosen.blocks, f"state {best}", seconds, tokens)
            if not moved:
                for later in range(r + 1, args.max_rounds + 1):
                    rows.append({**rows[-1], "method": f"cbo, {later} rounds", "how": f"state {best} (converged)"})
                break
        if m == 4 and args.bootstrap and expansions:
            # the last round's rows resampled: how often its ground state is the full sample's
            expansion = expansions[-1]
            centre = expansion.centre
            full = solve_artifact_near(artifact, config, expansion.energy_matrix().numpy(), centre, args.swaps)
            full = full.candidates[0].blocks
            rng = np.random.default_rng(0)
            same_round = same_first = 0
            ground_first = solve_artifact(artifact, config).candidates[0].blocks
            for _ in range(args.bootstrap):
                idx = torch.as_tensor(rng.integers(0, count, size=count))
                q = expansion.energy_matrix(idx).numpy()
                near = solve_artifact_near(artifact, config, q, centre, args.swaps)
                same_round += int(near.candidates[0].blocks == full)
                q0 = artifact.Q_samples[idx].double().mean(0).numpy()
                same_first += int(solve_artifact(artifact, config, Q=q0).candidates[0].blocks == ground_first)
            notes.append(
                f"M = 4 bootstrap ({args.bootstrap} draws of the {count} windows): ground state kept "
                f"{same_first / args.bootstrap:.0%} without rounds, {same_round / args.bootstrap:.0%} after the "
                f"last round (its rows resampled around the centre {centre})."
            )
            print(notes[-1], flush=True)
        # does the round's energy predict the calibration KL better? (its top-K, measured)
        if not expansions:
            continue
        states = [c.blocks for c in result.candidates]
        kl = measure_states(model, states, cal).kl
        notes.append(
            f"M = {m}: Spearman(energy after rounds, calibration KL) over its top-{len(states)} = "
            f"{spearman([c.energy for c in result.candidates], kl):.2f}; "
            f"predicted vs measured KL of its ground state {result.candidates[0].energy:.4f} / {kl[0]:.4f}."
        )
        print(notes[-1], flush=True)
    ctx = ScoringContext.from_config(model, tokenizer, base, None, sleb_samples=args.measured_samples)
    ctx.calibration = calibration
    for method in [b for b in args.baselines.split(",") if b]:
        for m in removes:
            t0 = time.perf_counter()
            chosen = score(method, ctx, m)[0]
            # forward tokens: SLEB's greedy steps so far × candidate blocks × samples; the one-pass statistics: none
            n = artifact.num_blocks
            tokens = sum(n - step for step in range(m)) * int(cal.attention_mask.sum()) if method == "sleb" else 0
            evaluate(method, m, chosen.blocks, "", time.perf_counter() - t0, tokens)
    for item in [i for i in args.states.split(";") if i]:
        label, rest = item.split("@")
        m, blocks = blocks_at(rest)
        evaluate(label, m, blocks, "fixed", 0.0, 0)
    write(args, name, rows, tests, unpruned, removes, notes)


def write(args, name, rows, tests, unpruned, removes, notes) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    labels = [*tests, "calibration KL"]
    lines = [f"# {name}: rounds of re-expansion against the baselines", ""]
    lines += [f"Rounds search a trust region of {args.swaps} swap{'s' * (args.swaps > 1)} around their centre.", ""]
    lines += ["Unpruned: " + ", ".join(f"{k} {unpruned[k]:.2f}" for k in tests) + ".", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for label in labels:
        lines += [f"## {label}", "", "| method | " + " | ".join(f"M={m}" for m in removes) + " |"]
        lines.append("| --- |" + " --- |" * len(removes))
        for method in methods:
            cells = []
            for m in removes:
                hit = [r for r in rows if r["method"] == method and r["M"] == m]
                best = min(r[label] for r in rows if r["M"] == m)
                if not hit:
                    cells.append("")
                    continue
                value = hit[0][label]
                mark = "**" if value <= best + 1e-9 else ""
                cells.append(f"{mark}{value:.4g}{mark} {hit[0]['blocks']}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Cost (seconds on this machine, model tokens through a forward)", ""]
    lines += ["| method | " + " | ".join(f"M={m}" for m in removes) + " |", "| --- |" + " --- |" * len(removes)]
    for method in methods:
        cells = []
        for m in removes:
            hit = [r for r in rows if r["method"] == method and r["M"] == m]
            cells.append(f"{hit[0]['seconds']} s, {hit[0]['tokens']:,}" if hit else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {n}" for n in notes], ""]
    write_tables(out, f"rounds_{name}", lines, rows)


if __name__ == "__main__":
    main()
