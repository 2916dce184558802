"""`hf-blockcbo prune`: calibrate (or reuse an artifact), solve, remove, save a plain transformers checkpoint."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo, add_calibration_args, add_model_args, add_solver_args


class PruneCommand(BaseCommand):
    COMMAND = CommandInfo(name="prune", help="remove blocks and save a checkpoint that loads in plain transformers")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_model_args(parser)
        add_calibration_args(parser)
        add_solver_args(parser, remove_required=False)
        pick = parser.add_argument_group("explicit choice")
        pick.add_argument("--hessian", help="reuse this artifact instead of calibrating")
        pick.add_argument("--save-hessian", help="also write the computed artifact here")
        pick.add_argument("--blocks", help="remove exactly these blocks, e.g. 3,5,7 (no calibration)")
        pick.add_argument("--candidates", help="candidates JSON from `solve`; with --rank picks one")
        pick.add_argument("--rank", type=int, help="state of the spectrum to remove (default 0 = ground state)")
        parser.add_argument("--output", required=True, help="folder for the pruned model")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    def run(self) -> int:
        from ..errors import BlockCBOError
        from ..hessian import HessianArtifact
        from ..io_utils import check_output_dir
        from ..models import load_model, resolve_model
        from ..pipeline import Selection, calibrate, prune_and_save, read_candidates, solve_artifact

        args = self.args
        config = self.config()
        check_output_dir(args.output, args.overwrite)  # fail before the long work, not after
        source = resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, dtype=config.dtype)
        artifact = None
        if config.blocks is not None:
            selection = Selection(blocks=config.blocks, how="explicit")
        elif args.candidates:
            rows = read_candidates(args.candidates)
            if config.rank >= len(rows):
                raise BlockCBOError(f"--rank {config.rank} is beyond the {len(rows)} states in {args.candidates}")
            row = rows[config.rank]
            selection = Selection(row["blocks"], "candidates file", row.get("energy"), row.get("rank", config.rank))
        else:
            if config.num_remove is None:
                raise BlockCBOError("say how many blocks to remove (--remove K), or pick them with --blocks")
            if args.hessian:
                artifact = HessianArtifact.load(args.hessian)
                from ..architectures import describe_blocks

                artifact.check_model(source.model_id, [b.name for b in describe_blocks(model)])
            else:
                artifact = calibrate(model, tokenizer, config, source, progress=not args.no_progress)
                if args.save_hessian:
                    artifact.save(args.save_hessian)
            result = solve_artifact(artifact, config)
            if config.rank >= len(result.candidates):
                raise BlockCBOError(f"--rank {config.rank} is beyond the {len(result.candidates)} states found")
            chosen = result.candidates[config.rank]
            solver = {k: v for k, v in result.to_dict().items() if k != "candidates"}
            solver["spectrum"] = [c.to_dict() for c in result.candidates]
            selection = Selection(list(chosen.blocks), "energy", chosen.energy, chosen.rank, solver)
        summary = prune_and_save(model, tokenizer, selection, args.output, source, config, artifact, args.overwrite)
        before, after = summary["num_parameters_before"], summary["num_parameters_after"]
        energy = "" if selection.energy is None else f", energy {selection.energy:.6g} (rank {selection.rank})"
        print(
            f"Removed blocks {summary['removed_blocks']}{energy}: {summary['num_blocks_before']} → "
            f"{summary['num_blocks_after']} blocks, {before / 1e6:.1f}M → {after / 1e6:.1f}M parameters "
            f"({100 * (1 - after / before):.1f}% fewer). Saved to {args.output}"
        )
        return 0
