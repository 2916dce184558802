"""`hf-blockcbo eval` (lm-evaluation-harness scores) and `hf-blockcbo bench` (measured speed and memory)."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo, add_config_flags, parse_int_list


def _check_outputs(args, inputs: list) -> None:
    """Refuse a bad --output or a --record without provenance before the long work."""
    from pathlib import Path

    from ..errors import BlockCBOError
    from ..io_utils import check_not_an_input, check_output_file
    from ..provenance import PROVENANCE_FILE

    if args.output:
        check_not_an_input(args.output, inputs)
        check_output_file(args.output, args.overwrite)
    if args.record and not (Path(args.model) / PROVENANCE_FILE).is_file():
        raise BlockCBOError(f"{args.model!r} has no {PROVENANCE_FILE}; --record needs a folder from prune")


def _write_results(args, key: str, payload: dict) -> None:
    """--output as JSON; --record: ``payload`` under ``key`` in the folder's provenance (atomically)."""
    from pathlib import Path

    from ..io_utils import write_json_atomic
    from ..provenance import PROVENANCE_FILE, Provenance

    if args.output:
        write_json_atomic(args.output, payload)
        print(f"Wrote {args.output}")
    if args.record:
        record = Provenance.from_dir(args.model).to_dict()
        record[key] = payload
        write_json_atomic(Path(args.model) / PROVENANCE_FILE, record)
        print(f"Recorded in {args.model}/{PROVENANCE_FILE}")


class EvalCommand(BaseCommand):
    COMMAND = CommandInfo(name="eval", help="lm-evaluation-harness scores of a model (or of it with blocks gated off)")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_config_flags(parser, "model")
        parser.add_argument(
            "--tasks",
            required=True,
            help="comma-separated harness task names (need the network) and/or local multiple-choice JSONL files",
        )
        parser.add_argument("--limit", type=int, help="score only the first N items of each task")
        parser.add_argument("--batch-size", type=int, default=8, help="harness batch size (default 8)")
        parser.add_argument(
            "--gated-blocks", help="score the model with these blocks switched off by gates (no copy), e.g. 3,4"
        )
        parser.add_argument("--output", help="also write the scores as JSON here")
        parser.add_argument(
            "--record", action="store_true", help="add the scores to the pruned folder's block_removal.json"
        )
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    def run(self) -> int:
        import json

        from ..errors import BlockCBOError
        from ..evaluation.harness import evaluate_tasks, require_lm_eval, split_tasks
        from ..models import load_model, resolve_model

        args = self.args
        require_lm_eval()  # before loading anything
        split_tasks(args.tasks.split(","))
        if args.limit is not None and args.limit <= 0:
            raise BlockCBOError(f"--limit must be a positive integer, got {args.limit}")
        if args.record and args.gated_blocks:
            raise BlockCBOError("--record stores the folder's own scores; drop --gated-blocks or --record")
        _check_outputs(args, [args.model, *args.tasks.split(",")])
        gated = parse_int_list(args.gated_blocks) or []
        source = resolve_model(args.model, args.revision)
        model, tokenizer = load_model(source, dtype=args.dtype or "auto")
        scores = evaluate_tasks(
            model, tokenizer, args.tasks.split(","), removed=gated, limit=args.limit, batch_size=args.batch_size
        )
        payload = {"tasks": scores, "limit": args.limit, "gated_blocks": gated, "harness": "lm-eval"}
        try:
            from importlib.metadata import version

            payload["harness_version"] = version("lm_eval")
        except Exception:  # noqa: BLE001 - the version is informative only
            pass
        print("| task | acc | ± | acc_norm |")
        print("| --- | --- | --- | --- |")
        for task, row in scores.items():
            norm = row.get("acc_norm")
            print(
                f"| {task} | {row.get('acc', float('nan')):.4f} | {row.get('acc_stderr', float('nan')):.4f} | "
                f"{'' if norm is None else f'{norm:.4f}'} |"
            )
        if not args.output:
            print(json.dumps(payload))
        _write_results(args, "evaluation", payload)
        return 0


class BenchCommand(BaseCommand):
    COMMAND = CommandInfo(name="bench", help="measured prefill/decode speed and memory: pruned vs original model")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_config_flags(parser, "model")
        parser.add_argument(
            "--baseline",
            help="the model to compare with (default: the original model named in the folder's block_removal.json)",
        )
        parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
        parser.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps (default 64)")
        parser.add_argument("--batch-size", type=int, default=1, help="prompts per batch (default 1)")
        parser.add_argument("--repeats", type=int, default=5, help="counted runs per model (default 5)")
        parser.add_argument("--warmup", type=int, default=1, help="uncounted runs per model first (default 1)")
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
        parser.add_argument("--output", help="also write the report as JSON here")
        parser.add_argument("--record", action="store_true", help="add the report to the folder's block_removal.json")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self) -> int:
        import torch

        from ..errors import BlockCBOError
        from ..evaluation.speed import benchmark
        from ..models import load_model, resolve_model
        from ..provenance import Provenance

        args = self.args
        for name in ("prompt_len", "new_tokens", "batch_size", "repeats"):
            if getattr(args, name) <= 0:
                raise BlockCBOError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
                )
        _check_outputs(args, [args.model, args.baseline])
        baseline, revision = args.baseline, None
        if baseline is None:
            record = Provenance.from_dir(args.model)  # a clear error when the folder was not written by prune
            baseline, revision = record.config.get("model"), record.config.get("revision")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BlockCBOError("--device cuda, but no CUDA device is available; use --device cpu")
        pruned, _ = load_model(resolve_model(args.model, args.revision), dtype=args.dtype or "auto")
        dtype = next(pruned.parameters()).dtype
        original, _ = load_model(resolve_model(baseline, revision), dtype=str(dtype).replace("torch.", ""))
        report = benchmark(
            {"original": original.to(device), "pruned": pruned.to(device)},
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            progress=not args.no_progress,
        )
        print(report.markdown())
        _write_results(args, "speed", report.to_dict())
        return 0
