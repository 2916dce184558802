"""`hf-blockcbo calibrate`: the Hessian pass, written as one safetensors artifact."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo, add_calibration_args, add_model_args


class CalibrateCommand(BaseCommand):
    COMMAND = CommandInfo(name="calibrate", help="compute per-sample gate gradients and the Hessian artifact")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_model_args(parser)
        add_calibration_args(parser)
        parser.add_argument("--output", required=True, help="path of the artifact (e.g. hessian.safetensors)")

    def run(self) -> int:
        from ..models import load_model, resolve_model
        from ..pipeline import calibrate

        config = self.config()
        source = resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, dtype=config.dtype)
        artifact = calibrate(model, tokenizer, config, source, progress=not self.args.no_progress)
        artifact.save(self.args.output)
        print(
            f"Hessian artifact: {self.args.output} ({artifact.num_samples} samples × {artifact.num_blocks} blocks, "
            f"{artifact.metadata['seconds']} s)"
        )
        return 0
