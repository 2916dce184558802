"""`hf-blockcbo compare`: CBO against every baseline on one model, one table, CSV and plots."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo, add_calibration_args, add_config_flags, add_model_args, parse_int_list


class CompareCommand(BaseCommand):
    COMMAND = CommandInfo(name="compare", help="compare CBO with BI, angular, norm ratio, SLEB, SWM and random")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_model_args(parser)
        add_calibration_args(parser)
        parser.add_argument("--remove", dest="removes", required=True, help="numbers of blocks to remove, e.g. 2,4,6")
        parser.add_argument(
            "--methods", default="cbo,bi,angular,norm_ratio,sleb,swm,random", help="scorers to compare"
        )
        parser.add_argument("--hessian", help="reuse this artifact for CBO instead of calibrating")
        add_config_flags(parser, "solver", exclude=("num_remove",))
        add_config_flags(parser, "selection", exclude=("validation_samples",))
        add_config_flags(parser, "repair", exclude=("repair_check",))  # compare measures both, folds nothing
        parser.add_argument("--test-data", help="test data (default: embedded test split)")
        parser.add_argument("--eval-samples", type=int, default=32, help="validation and test samples (default 32)")
        parser.add_argument("--sleb-samples", type=int, default=8, help="samples for SLEB's greedy loss (default 8)")
        parser.add_argument("--mc", help="multiple-choice JSONL files (benchkit format), comma-separated")
        parser.add_argument("--mc-limit", type=int, default=100, help="items per multiple-choice file (default 100)")
        parser.add_argument(
            "--tasks",
            help="lm-evaluation-harness tasks (names, or local multiple-choice JSONL files), comma-separated; "
            "items per task: --mc-limit",
        )
        parser.add_argument(
            "--speed", action="store_true", help="measure each row's decode speed-up on a physically pruned copy"
        )
        parser.add_argument("--output-dir", required=True, help="folder for compare.md, compare.csv, compare.png")
        parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")

    def run(self) -> int:
        import time

        from ..data import build_calibration_set
        from ..errors import BlockCBOError
        from ..hessian.artifact import HessianArtifact
        from ..io_utils import check_not_an_input, check_output_dir
        from ..models import load_model, model_fingerprint, resolve_model
        from ..pipeline import calibrate
        from ..selection.compare import run_comparison, write_comparison
        from ..selection.scorers import ScoringContext, available_scorers
        from ..surgery.architectures import describe_blocks

        args = self.args
        start = time.perf_counter()
        config = self.config()
        check_not_an_input(args.output_dir, [config.model, config.data, args.hessian, args.test_data])
        check_output_dir(args.output_dir, args.overwrite)
        harness_tasks = None
        if args.tasks:
            from ..evaluation.harness import require_lm_eval, split_tasks

            require_lm_eval()  # before the long work
            harness_tasks = args.tasks.split(",")
            split_tasks(harness_tasks)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(available_scorers()))
        if unknown:
            raise BlockCBOError(f"unknown methods {unknown}; choose from {', '.join(available_scorers())}")
        removes = parse_int_list(args.removes)
        source = resolve_model(config.model, config.revision)
        model, tokenizer = load_model(source, dtype=config.dtype)
        progress = not args.no_progress
        artifact = None
        if "cbo" in methods:
            if args.hessian:
                artifact = HessianArtifact.load(args.hessian)
                artifact.check_model(
                    source.model_id, [b.name for b in describe_blocks(model)], model_fingerprint(model)
                )
            else:
                artifact = calibrate(model, tokenizer, config, source, progress=progress)

        def held_out(data, default):
            return build_calibration_set(
                tokenizer, data or default, num_samples=args.eval_samples, seq_len=config.seq_len, seed=config.seed
            )

        validation = held_out(config.validation_data, "embedded:validation")
        test = held_out(args.test_data, "embedded:test")
        ctx = ScoringContext.from_config(
            model, tokenizer, config, artifact, progress=progress, sleb_samples=args.sleb_samples
        )
        from pathlib import Path

        from ..evaluation.likelihood import read_multiple_choice

        mc_tasks = {
            Path(path).stem: read_multiple_choice(path, limit=args.mc_limit)
            for path in (args.mc.split(",") if args.mc else [])
        }
        repair_data = None
        if config.repair:
            from ..data import repair_samples
            from ..repair.least_squares import check_repairable

            check_repairable(model, [], settings=config.repair_settings)
            repair_data = repair_samples(tokenizer, config)
        comparison = run_comparison(
            ctx,
            methods,
            removes,
            validation,
            test,
            config.select,
            progress,
            tokenizer=tokenizer,
            mc_tasks=mc_tasks,
            repair_data=repair_data,
            repair_settings=config.repair_settings,
            harness_tasks=harness_tasks,
            harness_limit=args.mc_limit,
            speed=args.speed,
        )
        written = write_comparison(comparison, args.output_dir, len(describe_blocks(model)))
        print(comparison.markdown())
        print(f"wall time {time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in written)}")
        return 0
