"""Distillation step time on CPU with glibc keeping freed memory (the default of `heal`) against without, side by side.

    python benchmarks/heal_allocator.py --model gemma3 --blocks 7,8,9,12 --steps 8 --repeats 2
    python benchmarks/heal_allocator.py --model gemma3 --blocks 7,8,9,12 --steps 16 --warm-steps 4 --repeats 1 --skip-env
    python benchmarks/heal_allocator.py --model smollm2 --blocks 13,14,15,16,17,18 --steps 8 --repeats 2

Prunes the model once, then runs `hf-blockcbo heal` in a fresh process per arm, interleaved (``--repeats`` rounds of
every arm: glibc's defaults, `heal`'s own setting, the same request as environment variables), and reads each run's
training seconds from the healed model's provenance, its kernel / user CPU time and peak RSS from the process's own
resource usage. Prints one row per run and the ratio of the median seconds per step; with
``--warm-steps W`` each arm also runs W steps, and the difference gives the steady step time without the first steps,
where the heap still grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import model_argument  # noqa: E402


CLI = [sys.executable, "-m", "hf_blockcbo.cli"]
ENV_SETTINGS = {  # the same request made through glibc's environment variables, read when the process starts
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
BASELINE = "system default (--no-keep-freed-memory)"  # the arm the ratios divide
ARMS = {  # name → (heal flags, environment added)
    "keep freed memory (default)": ([], {}),
    BASELINE: (["--no-keep-freed-memory"], {}),
    "MALLOC_* environment variables (--no-keep-freed-memory)": (["--no-keep-freed-memory"], ENV_SETTINGS),
}


def run_heal(
    student: Path, output: Path, steps: int, seq_len: int, batch: int, extra: list[str], env_added: dict
) -> dict:
    argv = [
        *CLI, "heal", "--student", str(student), "--output", str(output), "--max-steps", str(steps),
        "--heal-batch-size", str(batch), "--max-length", str(seq_len), "--save-steps", "1000000",
        "--learning-rate", "1e-4", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_added
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"heal failed:\n{log[-3000:]}")
    healing = json.loads((output / "block_removal.json").read_text())["healing"]
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(str(output) + ".checkpoints", ignore_errors=True)
    train_s = healing["train_seconds"]
    return {
        "s_per_step": train_s / healing["steps"],
        "train_s": train_s,
        "system_cpu_s": usage.ru_stime,
        "user_cpu_s": usage.ru_utime,
        "peak_rss_gb": usage.ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--blocks", default="7,8,9,12")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--warm-steps",
        type=int,
        default=0,
        help="also run each arm for this many steps and report (T(steps) − T(warm)) / (steps − warm): the steady "
        "step time, without the first steps where the heap still grows (0: off)",
    )
    parser.add_argument("--skip-env", action="store_true", help="leave out the environment-variable arm")
    args = parser.parse_args()
    if not 0 <= args.warm_steps < args.steps:
        parser.error("--warm-steps must be in [0, --steps)")
    arms = {a: v for a, v in ARMS.items() if not (args.skip_env and v[1])}
    work = Path(tempfile.mkdtemp(prefix="heal_allocator_"))
    try:
        student = work / "student"
        model = model_argument(args.model)
        prune = [*CLI, "prune", "--blocks", args.blocks, "--output", str(student)]
        subprocess.run(prune + (["--model", model] if model else []), check=True, capture_output=True)
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            for arm, (extra, env_added) in arms.items():
                row = run_heal(student, work / "healed", args.steps, args.seq_len, args.batch, extra, env_added)
                if args.warm_steps:
                    warm = run_heal(
                        student, work / "healed", args.warm_steps, args.seq_len, args.batch, extra, env_added
                    )
                    row["steady_s_per_step"] = (row["train_s"] - warm["train_s"]) / (args.steps - args.warm_steps)
                runs[arm].append(row)
                steady = f" (steady {row['steady_s_per_step']:.2f})" if args.warm_steps else ""
                print(
                    f"round {repeat + 1} | {arm} | {row['s_per_step']:.2f} s/step{steady} | system CPU "
                    f"{row['system_cpu_s']:.0f} s, user {row['user_cpu_s']:.0f} s | peak RSS "
                    f"{row['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{args.model}, blocks [{args.blocks}] removed, batch {args.batch} × {args.seq_len} tokens, {args.repeats} rounds"
    )
    measures = {"s_per_step": f"s/step over {args.steps} steps"}
    if args.warm_steps:
        measures["steady_s_per_step"] = "steady s/step"
    for key, what in measures.items():
        median = {arm: statistics.median(r[key] for r in runs[arm]) for arm in arms}
        print(
            f"median {what}: " + "; ".join(f"{arm} {v:.2f} ({median[BASELINE] / v:.2f}×)" for arm, v in median.items())
        )


if __name__ == "__main__":
    main()
