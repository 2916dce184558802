"""`hf-blockcbo solve`: the K lowest-energy removal sets from a Hessian artifact."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

from .base import BaseCommand, CommandInfo, add_solver_args


class SolveCommand(BaseCommand):
    COMMAND = CommandInfo(name="solve", help="find the K lowest-energy sets of blocks to remove")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.add_argument("--hessian", required=True, help="artifact written by `hf-blockcbo calibrate`")
        parser.add_argument("--config", help="a BlockRemovalConfig JSON/YAML file; flags override its values")
        add_solver_args(parser, remove_required=False)
        parser.add_argument("--output", help="candidates JSON (list of {rank, blocks, energy})")
        parser.add_argument("--plot", help="PNG: energy vs rank and the block-frequency map of the K states")
        parser.add_argument("--overwrite", action="store_true", help="replace existing --output / --plot files")

    def run(self) -> int:
        from ..hessian.artifact import HessianArtifact
        from ..io_utils import check_not_an_input, check_output_file
        from ..pipeline import solve_artifact, write_candidates

        config = self.config()
        for output in (self.args.output, self.args.plot):
            if output:
                check_not_an_input(output, [self.args.hessian, self.args.config])
                check_output_file(output, self.args.overwrite)
        artifact = HessianArtifact.load(self.args.hessian)
        result = solve_artifact(artifact, config)
        if self.args.plot:  # the plot first: a plot that fails leaves no candidates file behind
            from ..selection.plots import plot_spectrum

            plot_spectrum(result, self.args.plot, artifact.block_kinds)
        if self.args.output:
            try:
                write_candidates(result, self.args.output, artifact)
            except BaseException:
                if self.args.plot:
                    Path(self.args.plot).unlink(missing_ok=True)
                raise
        status = "certified exact" if result.certified else "not certified (heuristic)"
        if not result.certified and result.lower_bound is not None:
            status += f"; every state not listed has energy ≥ {result.lower_bound:.6g} (proven bound)"
        print(f"{len(result.candidates)} states by {result.method} in {result.seconds:.2f} s, {status}")
        for c in result.candidates[: min(10, len(result.candidates))]:
            print(f"  rank {c.rank:>3}  energy {c.energy:.6g}  blocks {list(c.blocks)}")
        return 0
