"""Is the ground state resolved by its calibration rows? For saved Hessian artifacts, at each M: the ground state, its
runner-up, the runner-up's energy minus the ground state's paired over the calibration rows (± its standard error),
and, side by side, the share of bootstrap resamples of the rows that keep the ground state (`diagnose --bootstrap`).
No model is loaded: both come from the artifact's per-sample rows.

    python benchmarks/ground_margin.py --removes 2,4,6,8 --draws 1000 \
        --hessian spaces/blockcbo-demo/smollm2_hessian.safetensors --output docs/results/stability

Writes ``ground_margin.md`` and ``.csv`` into ``--output``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from _models import write_tables  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.selection.diagnose import bootstrap_stability, ground_margin
from hf_blockcbo.solvers.dispatch import solve_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hessian", required=True, help="artifacts, separated by commas")
    parser.add_argument("--removes", default="2,4,6,8")
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap resamples of the calibration rows")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    lines = [
        "# Does the calibration resolve the ground state?",
        "",
        f"Command: `python benchmarks/ground_margin.py {shlex.join(sys.argv[1:])}`",
        "",
        "Lead: the runner-up's energy minus the ground state's, paired over the calibration rows (± standard error); "
        "*tie*: under 2 standard errors.",
        "",
        "| artifact | rows | M | ground state | runner-up | lead ± s.e. | lead / s.e. | bootstrap: ground state kept |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in args.hessian.split(","):
        artifact = HessianArtifact.load(path)
        for m in (int(x) for x in args.removes.split(",")):
            config = BlockRemovalConfig(curvature=artifact.curvature, num_remove=m, top_k=args.top_k)
            began = time.perf_counter()
            states = [c.blocks for c in solve_artifact(artifact, config).candidates]
            margin = ground_margin(artifact, config, states)
            kept = bootstrap_stability(artifact, config, draws=args.draws, seed=0).ground_kept
            ratio = margin.lead / margin.standard_error if margin.standard_error > 0 else float("inf")
            tie = "" if margin.resolved else ", *tie*"
            lines.append(
                f"| {Path(path).name} | {artifact.num_samples} | {m} | {list(states[0])} | {list(margin.runner_up)} | "
                f"{margin.lead:.4f} ± {margin.standard_error:.4f}{tie} | {ratio:.2f} | {100 * kept:.0f} % |"
            )
            rows.append(
                {
                    "artifact": path,
                    "rows": artifact.num_samples,
                    "M": m,
                    "ground": list(states[0]),
                    "runner_up": list(margin.runner_up),
                    "lead": margin.lead,
                    "standard_error": margin.standard_error,
                    "bootstrap_kept": kept,
                    "seconds": time.perf_counter() - began,
                }
            )
    write_tables(out, "ground_margin", lines, rows)


if __name__ == "__main__":
    main()
