"""`hf-blockcbo diagnose`: does the energy predict the damage? Measured on held-out text, with a plot."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo, add_calibration_args, add_config_flags, add_model_args, parse_int_list


SELECTION_UNUSED = ("select", "measured_rounds", "measured_round_swaps", "measured_round_trigger")


class DiagnoseCommand(BaseCommand):
    COMMAND = CommandInfo(
        name="diagnose",
        help="measure the true damage of the top-K and of random states; rank correlation with the energy",
    )

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_model_args(parser)
        add_calibration_args(parser)
        add_config_flags(parser, "solver", exclude=("num_remove",))
        add_config_flags(parser, "selection", exclude=SELECTION_UNUSED)
        parser.add_argument("--remove", dest="removes", required=True, help="numbers of blocks to remove, e.g. 2,4,6")
        parser.add_argument("--hessian", help="diagnose this artifact instead of calibrating")
        parser.add_argument("--eval-data", help="held-out data the damage is measured on (default embedded:test)")
        parser.add_argument("--eval-samples", type=int, default=8, help="held-out samples (default 8)")
        parser.add_argument("--random-states", type=int, default=10, help="random states per M (default 10)")
        parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of the ground state")
        parser.add_argument(
            "--pick-stability",
            action="store_true",
            help="with --bootstrap, also how often a resample's validation pick (among its own top-K, by "
            "--validation-metric on --validation-data) is the full sample's pick",
        )
        parser.add_argument("--output-dir", required=True, help="folder for diagnose.md and diagnose.png")
        parser.add_argument("--overwrite", action="store_true", help="replace diagnose.md / diagnose.png")

    def run(self) -> int:
        from pathlib import Path

        from ..data import build_calibration_set
        from ..errors import BlockCBOError
        from ..hessian.artifact import HessianArtifact
        from ..io_utils import atomic_file
        from ..models import load_model, model_fingerprint, resolve_model
        from ..pipeline import calibrate, validation_samples
        from ..selection.diagnose import diagnose, plot_diagnoses
        from ..surgery.architectures import describe_blocks

        args = self.args
        config = self.config()
        removes = parse_int_list(args.removes)
        out = Path(args.output_dir)
        targets = [out / "diagnose.md", out / "diagnose.png"]
        if not args.overwrite and any(t.exists() for t in targets):
            raise BlockCBOError(f"{out} already holds a diagnosis; pass --overwrite to replace it")
        if args.eval_samples <= 0 or args.random_states < 0 or args.bootstrap < 0:
            raise BlockCBOError("--eval-samples must be positive, --random-states and --bootstrap non-negative")
        if args.pick_stability and not args.bootstrap:
            raise BlockCBOError("--pick-stability resamples the calibration rows: give --bootstrap a positive count")
        source = resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, dtype=config.dtype)
        held_out = build_calibration_set(
            tokenizer, args.eval_data or "embedded:test", args.eval_samples, config.seq_len, seed=config.seed
        )
        if args.hessian:
            artifact = HessianArtifact.load(args.hessian)
            artifact.check_model(source.model_id, [b.name for b in describe_blocks(model)], model_fingerprint(model))
        else:
            artifact = calibrate(model, tokenizer, config, source, progress=not args.no_progress)
        config = config.replace(curvature=artifact.curvature)
        validation = validation_samples(tokenizer, config) if args.pick_stability else None
        result = diagnose(
            model,
            artifact,
            config,
            held_out,
            removes,
            args.random_states,
            args.bootstrap,
            not args.no_progress,
            validation=validation,
        )
        out.mkdir(parents=True, exist_ok=True)
        text = result.markdown()
        with atomic_file(targets[0]) as tmp:
            tmp.write_text(text, encoding="utf-8")
        plot_diagnoses([result], targets[1], title=f"{source.model_id}: energy vs measured held-out KL")
        print(text)
        print(f"wrote {targets[0]} and {targets[1]}")
        return 0
