"""`hf-blockcbo heal`: knowledge distillation from the unpruned teacher into the pruned model (TRL)."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo


def add_heal_args(parser: ArgumentParser, data_flag: str = "--heal-data") -> None:
    group = parser.add_argument_group("healing (knowledge distillation)")
    group.add_argument(
        data_flag, dest="heal_data", help="training data: .txt / .jsonl text or chat (default: embedded)"
    )
    group.add_argument("--max-steps", type=int, default=-1, help="training steps (default: one epoch)")
    group.add_argument("--learning-rate", type=float, default=2e-5, help="default 2e-5 (paper)")
    group.add_argument("--heal-batch-size", type=int, default=4, help="per-device batch size (default 4)")
    group.add_argument("--max-length", type=int, default=1024, help="tokens per training sample (default 1024)")
    group.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    group.add_argument("--alpha-ce", type=float, default=0.0, help="weight of the data cross-entropy (default 0)")
    group.add_argument("--assistant-only", action="store_true", help="chat data: distil on assistant tokens only")
    group.add_argument("--teacher-4bit", action="store_true", help="NF4 teacher via bitsandbytes (CUDA only)")
    group.add_argument(
        "--teacher-top-k",
        type=int,
        default=0,
        help="cache the teacher's top-k log-probs once, then train without the teacher in memory (0: live teacher)",
    )
    group.add_argument("--teacher-cache", help="file for the cached teacher log-probs (kept; default: temporary)")
    group.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps (resume on rerun)")
    group.add_argument("--eval-data", help="validation data for perplexity before/after (default: embedded split)")
    group.add_argument("--heal-seed", type=int, default=0, help="training seed")


def heal_config(args, output_dir: str):
    from ..healing import HealConfig

    return HealConfig(
        output_dir=output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.heal_batch_size,
        max_length=args.max_length,
        temperature=args.temperature,
        alpha_ce=args.alpha_ce,
        teacher_top_k=args.teacher_top_k,
        assistant_only_loss=args.assistant_only,
        save_steps=args.save_steps,
        save_strategy="steps",
        logging_steps=max(1, min(10, args.save_steps)),
        seed=args.heal_seed,
        use_cpu=not __import__("torch").cuda.is_available(),
    )


def run_heal(args, student: str, teacher: str) -> dict:
    """Heal ``student`` into ``args.output`` with the flags of `add_heal_args`; print and return the report."""
    from ..healing import heal

    report = heal(
        student,
        teacher,
        args.heal_data,
        args.output,
        heal_config(args, args.output),
        args.eval_data,
        teacher_4bit=args.teacher_4bit,
        overwrite=args.overwrite,
        teacher_cache=args.teacher_cache,
    )
    print(
        f"Healed {student} → {args.output} in {report['steps']} steps ({report['train_seconds']:.0f} s): validation "
        f"perplexity {report['validation_perplexity_before']:.2f} → {report['validation_perplexity_after']:.2f}"
    )
    return report


class HealCommand(BaseCommand):
    COMMAND = CommandInfo(name="heal", help="recover quality by distillation from the unpruned teacher (TRL)")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.add_argument("--student", required=True, help="pruned folder (from `hf-blockcbo prune`)")
        parser.add_argument("--teacher", help="the unpruned model (default: the student's base model)")
        parser.add_argument("--output", required=True, help="folder for the healed model")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
        add_heal_args(parser, data_flag="--data")

    def run(self) -> int:
        import json
        from pathlib import Path

        from ..errors import BlockCBOError

        a = self.args
        teacher = a.teacher
        if teacher is None:
            provenance = Path(a.student) / "block_removal.json"
            if not provenance.is_file():
                raise BlockCBOError("no --teacher given and the student has no block_removal.json naming its base")
            teacher = json.loads(provenance.read_text())["model"]
        run_heal(a, a.student, teacher)
        return 0
