"""`hf-blockcbo heal`: knowledge distillation from the unpruned teacher into the pruned model (TRL)."""

from __future__ import annotations

from argparse import ArgumentParser

from .base import BaseCommand, CommandInfo


def add_heal_args(parser: ArgumentParser, data_flag: str = "--heal-data") -> None:
    """Healing flags: the `HealSettings` fields (help and defaults from the dataclass) plus data and teacher options."""
    from ..healing.settings import HEAL_FLAG_FIELDS, HEAL_FLAG_NAMES, HealSettings
    from .base import add_dataclass_flags

    group = parser.add_argument_group("healing (knowledge distillation)")
    group.add_argument(
        data_flag, dest="heal_data", help="training data: .txt / .jsonl text or chat (default: embedded)"
    )
    add_dataclass_flags(group, HealSettings, HEAL_FLAG_FIELDS, HEAL_FLAG_NAMES)
    group.add_argument("--teacher-4bit", action="store_true", help="NF4 teacher via bitsandbytes (CUDA only)")
    group.add_argument("--teacher-cache", help="file for the cached teacher log-probs (kept; default: temporary)")
    group.add_argument("--eval-data", help="validation data for perplexity before/after (default: embedded split)")


def heal_settings(args):
    """`HealSettings` from the flags that were given (the dataclass supplies every default)."""
    from ..healing.settings import HEAL_FLAG_FIELDS, HealSettings

    return HealSettings(**{n: getattr(args, n) for n in HEAL_FLAG_FIELDS if getattr(args, n, None) is not None})


def heal_config(args, output_dir: str):
    from ..healing.trainer import HealConfig

    settings = heal_settings(args)
    return HealConfig(
        output_dir=output_dir,
        **settings.to_dict(),
        save_strategy="steps",
        logging_steps=max(1, min(10, settings.save_steps)),
        use_cpu=not __import__("torch").cuda.is_available(),
    )


def run_heal(args, student: str, teacher: str) -> dict:
    """Heal ``student`` into ``args.output`` with the flags of `add_heal_args`; print and return the report."""
    from ..healing.trainer import heal

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
        student = Path(a.student)
        if student.is_dir() and not (student / "config.json").is_file():
            raise BlockCBOError(
                f"--student {a.student} is not a model folder (no config.json); give the folder "
                "`hf-blockcbo prune` wrote"
            )
        if not student.is_dir() and a.teacher is None:
            raise BlockCBOError(
                f"--student {a.student} is not a folder here; give the folder `hf-blockcbo prune` wrote (a student "
                "on the Hub needs --teacher)"
            )
        teacher = a.teacher
        if teacher is None:
            provenance = Path(a.student) / "block_removal.json"
            if not provenance.is_file():
                raise BlockCBOError("no --teacher given and the student has no block_removal.json naming its base")
            teacher = json.loads(provenance.read_text())["model"]
        run_heal(a, a.student, teacher)
        return 0
