"""`hf-blockcbo prune`: calibrate (or reuse an artifact), choose blocks, remove them, save a plain checkpoint."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import (
    BaseCommand,
    CommandInfo,
    add_calibration_args,
    add_config_flags,
    add_model_args,
    add_selection_args,
    add_solver_args,
)
from .heal import add_heal_args, run_heal


class PruneCommand(BaseCommand):
    COMMAND = CommandInfo(name="prune", help="remove blocks and save a checkpoint that loads in plain transformers")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_model_args(parser)
        add_calibration_args(parser)
        add_solver_args(parser, remove_required=False)
        add_selection_args(parser)
        add_config_flags(parser, "choice")
        add_config_flags(parser, "repair")
        pick = parser.add_argument_group("artifacts")
        pick.add_argument("--hessian", help="reuse this artifact instead of calibrating")
        pick.add_argument("--save-hessian", help="also write the computed artifact here")
        pick.add_argument("--candidates", help="candidates JSON from `solve`; with --rank picks one")
        parser.add_argument("--output", required=True, help="folder for the pruned model")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
        parser.add_argument("--heal", action="store_true", help="then heal by distillation from the unpruned model")
        add_heal_args(parser)
        hub = parser.add_argument_group("hub")
        hub.add_argument("--push-to-hub", help="also upload the result to this Hub repository (user/name)")
        hub.add_argument("--private", action="store_true", help="create the Hub repository private")
        hub.add_argument("--revision-push", dest="push_revision", help="branch to push to (default main)")

    def run(self) -> int:
        from ..hessian.artifact import HessianArtifact
        from ..io_utils import check_not_an_input, check_output_dir, check_output_file
        from ..models import load_model, model_fingerprint, resolve_model
        from ..pipeline import choose_blocks, prune_and_save
        from ..surgery.architectures import describe_blocks

        args = self.args
        config = self.config()
        from ..data import check_data_file

        inputs = [config.model, config.data, config.validation_data, args.hessian, args.candidates, args.config]
        inputs += config.repair_sources
        for data in [config.data, config.validation_data] + (config.repair_sources if config.repair else []):
            check_data_file(data)  # a missing data file is one line before the model loads
        check_not_an_input(args.output, inputs)
        check_output_dir(args.output, args.overwrite)  # fail before the long work, not after
        if args.save_hessian:
            check_not_an_input(args.save_hessian, inputs)
            check_output_file(args.save_hessian, args.overwrite)
        source = resolve_model(config.model, config.revision)
        explicit = config.blocks is not None or bool(args.candidates)
        model, tokenizer = load_model(
            source, dtype=config.dtype, need_tokenizer=not explicit or config.repair or args.heal
        )
        if args.heal and config.repair:  # distillation follows the repair: `auto` takes the family's start for it
            from ..repair.least_squares import kind_before_training

            config = config.replace(repair_kind=kind_before_training(model, config.repair_kind))
        artifact = None
        if args.hessian:
            artifact = HessianArtifact.load(args.hessian)
            artifact.check_model(source.model_id, [b.name for b in describe_blocks(model)], model_fingerprint(model))
        selection, artifact = choose_blocks(
            model, tokenizer, config, source, artifact, args.candidates, progress=not args.no_progress
        )
        if args.save_hessian and artifact is not None:
            artifact.save(args.save_hessian)
        target = f"{args.output}.pruned" if args.heal else args.output
        summary = prune_and_save(
            model,
            tokenizer,
            selection,
            target,
            source,
            config,
            artifact,
            args.overwrite,
            progress=not args.no_progress,
        )
        before, after = summary["num_parameters_before"], summary["num_parameters_after"]
        energy = "" if selection.energy is None else f", energy {selection.energy:.6g}"
        rank = "" if selection.rank is None else f" (state {selection.rank})"
        val = "" if selection.validation_ppl is None else f", validation ppl {selection.validation_ppl:.2f}"
        print(
            f"Removed blocks {summary['removed_blocks']} by {selection.how}{energy}{rank}{val}: "
            f"{summary['num_blocks_before']} → {summary['num_blocks_after']} blocks, {before / 1e6:.1f}M → "
            f"{after / 1e6:.1f}M parameters ({100 * (1 - after / before):.1f}% fewer). Saved to {args.output}"
        )
        for line in repair_report(summary):
            print(line)
        if args.heal:
            import shutil

            del model
            run_heal(args, target, source.model_id)
            shutil.rmtree(target, ignore_errors=True)
        if args.push_to_hub:
            from ..hub.publish import push_model

            url = push_model(
                args.output, args.push_to_hub, args.private, args.push_revision, hessian=args.save_hessian
            )
            print(f"Pushed to {args.push_to_hub}: {url}")
        return 0


def repair_report(summary: dict) -> list[str]:
    """What `prune` says of a folded repair: the maps and refits and their stream errors, then the validation check
    (a repair the check kept out is the pipeline's one-line warning)."""
    repair = summary.get("repair")
    if not repair:  # none asked for, or one the check rejected: the pipeline's warning said so, for every face
        return []
    fits = ", ".join(f"{r['fit_error_before']:.3g} → {r['fit_error_after']:.3g}" for r in repair["runs"])
    lines = [
        f"Repaired {len(repair['runs'])} removed run(s) without training ({repair['kind']} maps folded into the "
        f"weights, {repair['seconds']:.1f} s, fitted on {repair['tokens']:,} tokens of {repair['data']}); relative "
        f"stream error after each gap: {fits}"
    ]
    refits = repair.get("refits") or []
    if refits:
        fits = ", ".join(f"{r['block']}: {r['fit_error_before']:.3g} → {r['fit_error_after']:.3g}" for r in refits)
        lines.append(f"Refitted the output projection of {len(refits)} kept block(s) after the gaps: {fits}")
    check = repair.get("validation")
    if check:
        lines.append(
            f"The repair lowered the validation perplexity on {check['data']} from "
            f"{check['perplexity_unrepaired']:.2f} to {check['perplexity_repaired']:.2f} (checked in "
            f"{check['seconds']:.1f} s)"
        )
    return lines
