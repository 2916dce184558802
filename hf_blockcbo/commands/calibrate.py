"""`hf-blockcbo calibrate`: the Hessian pass, written as one safetensors artifact (Accelerate-distributed, resumable)."""

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
        parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
        scale = parser.add_argument_group("scale")
        scale.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint rows every N batches (0: off)")
        scale.add_argument(
            "--device-map", help="Accelerate big-model dispatch, e.g. auto (models larger than a device)"
        )
        scale.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
        scale.add_argument(
            "--fsdp",
            action="store_true",
            help="shard the weights over the launched processes with FSDP2 (also on with `accelerate launch --use_fsdp`)",
        )

    def run(self) -> int:
        from ..errors import BlockCBOError
        from ..hessian.distributed import fsdp_requested, process_state
        from ..hessian.resume import remove_partials
        from ..io_utils import check_not_an_input, check_output_file
        from ..models import load_model, resolve_model
        from ..pipeline import calibrate

        args = self.args
        config = self.config()
        check_not_an_input(args.output, [config.model, config.data, config.validation_data])
        check_output_file(args.output, args.overwrite)  # before the long work, not after
        _, world, is_main, state = process_state()
        fsdp = (args.fsdp or fsdp_requested()) and world > 1
        if fsdp and args.device_map:
            raise BlockCBOError("--fsdp and --device-map are two ways to split a model; use one")
        source = resolve_model(config.model, config.revision) if is_main else None
        state.wait_for_everyone()  # the main process converts a GGUF once; the others read the cache
        source = source or resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, config.dtype, args.device_map, args.gradient_checkpointing)
        if args.device_map is None:
            model.to(state.device)
        artifact = calibrate(
            model, tokenizer, config, source, not args.no_progress, args.output, args.checkpoint_every, fsdp
        )
        if is_main:
            artifact.save(args.output)
        state.wait_for_everyone()
        if is_main:
            remove_partials(args.output)
            print(
                f"Hessian artifact: {args.output} ({artifact.num_samples} samples × {artifact.num_blocks} blocks, "
                f"{world} process{'es' if world > 1 else ''}, {artifact.metadata['seconds']} s)"
            )
        return 0
