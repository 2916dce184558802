"""Base class of the CLI commands and the flags they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from argparse import ArgumentParser, Namespace
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class CommandInfo:
    name: str
    help: str


class BaseCommand(ABC):
    """A subcommand: `COMMAND` names it, `parse_args` declares its flags, `run` does the work (imports inside)."""

    COMMAND: ClassVar[CommandInfo]

    def __init__(self, args: Namespace) -> None:
        self.args = args

    @staticmethod
    @abstractmethod
    def parse_args(parser: ArgumentParser) -> None:
        """Declare the command's flags on ``parser``."""

    @abstractmethod
    def run(self) -> int:
        """Do the work; return the exit code."""

    def config(self):
        """The `BlockRemovalConfig` from `--config` (if given) with every flag that was set laid over it."""
        return config_from_args(self.args)


def parse_int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from ..errors import BlockCBOError

    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise BlockCBOError(f"expected a comma-separated list of block indices like 3,5,7, got {text!r}") from err


def parse_per_kind_flag(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    from ..solvers.constrained import parse_per_kind

    return parse_per_kind(text)


# -- flags generated from BlockRemovalConfig's field metadata -----------------------------------------------------
# The one table of flags whose name is not the field's (--num-remove would be the field's name).
FLAG_NAMES = {"num_remove": "--remove", "protected": "--protect"}
# Fields shown in each group, by the commands that take the group.
GROUPS = {
    "model": ("model", "revision", "dtype"),
    "calibration": ("data", "num_samples", "seq_len", "batch_size", "packing", "gate"),
    "curvature": ("curvature", "measured_pairs", "measured_samples", "damage"),
    "solver": ("num_remove", "top_k", "solver", "protected", "per_kind", "param_budget", "beta", "seed", "time_limit"),
    "selection": (
        "select",
        "validation_data",
        "validation_samples",
        "validation_metric",
        "measured_rounds",
        "measured_round_swaps",
        "measured_round_trigger",
    ),
    "choice": ("scorer", "rank", "blocks"),
    "repair": (
        "repair",
        "repair_aware",
        "repair_samples",
        "repair_data",
        "repair_ridge",
        "repair_weighting",
        "repair_kind",
        "repair_depth",
        "repair_check",
    ),
}
_CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "packing": ("auto", "pack", "truncate"),
    "gate": ("auto", "branch", "layer"),
    "select": ("validation", "energy"),
    "validation_metric": ("kl", "perplexity"),
    "damage": ("kl", "ce"),
}


def flag_name(field_name: str) -> str:
    return FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _for_argparse(parse):
    """argparse prints an `ArgumentTypeError`'s own message (one line, exit 2); other errors become 'invalid value'."""
    from argparse import ArgumentTypeError

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:  # BlockCBOError is a ValueError
            raise ArgumentTypeError(str(err)) from err

    convert.__name__ = parse.__name__
    return convert


def _converter(field_name: str, annotation: str):
    if field_name in ("protected", "blocks"):
        return _for_argparse(parse_int_list)
    if field_name == "per_kind":
        return _for_argparse(parse_per_kind_flag)
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def add_dataclass_flags(section, cls, names, flag_names: dict[str, str], required=(), choices=None) -> None:
    """One flag per field of the dataclass ``cls`` in ``names``: help and default shown from the field itself, flag
    name from ``flag_names`` or the field's name; bools become ``--x/--no-x``. Flags default to None (not given)."""
    import dataclasses
    from argparse import BooleanOptionalAction

    fields = {f.name: f for f in dataclasses.fields(cls)}
    choices = choices or {}
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, [], {}) else f" (default {default})"
        help_text = f.metadata.get("help", "").replace("%", "%%") + shown
        flag = flag_names.get(name, "--" + name.replace("_", "-"))
        if str(f.type) == "bool":
            section.add_argument(flag, dest=name, action=BooleanOptionalAction, default=None, help=help_text)
            continue
        section.add_argument(
            flag,
            dest=name,
            type=_converter(name, str(f.type)),
            choices=choices.get(name),
            required=name in required,
            help=help_text,
        )


def add_config_flags(
    parser: ArgumentParser, group: str, required: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> None:
    """Add one flag per `BlockRemovalConfig` field of ``group``; help and default come from the field itself.

    Flags default to None (not given), so a `--config` file's values survive unless a flag overrides them.
    """
    from ..config import REPAIR_KIND_CHOICES, REPAIR_WEIGHTINGS, BlockRemovalConfig

    choices = dict(_CHOICES)
    if "curvature" in GROUPS[group]:
        from ..hessian.curvature import available_curvatures

        choices["curvature"] = tuple(available_curvatures())
    if "repair_weighting" in GROUPS[group]:
        choices["repair_weighting"] = REPAIR_WEIGHTINGS
        choices["repair_kind"] = REPAIR_KIND_CHOICES
    names = [n for n in GROUPS[group] if n not in exclude]
    add_dataclass_flags(parser.add_argument_group(group), BlockRemovalConfig, names, FLAG_NAMES, required, choices)


def to_flags(message: str) -> str:
    """A library error names config fields (`num_remove`, `solver=tabu`); on the command line they read as flags."""
    import dataclasses
    import re

    from ..config import BlockRemovalConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(BlockRemovalConfig)}

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in fields:
            return match.group(0)
        if fields[name] == "bool" and value is not None:  # --repair / --no-repair
            return flag_name(name) if value.lower() == "true" else "--no-" + name.replace("_", "-")
        return flag_name(name) + (f" {value}" if value is not None else "")

    return re.sub(r"`([a-z_]+)(?:=([^`]*))?`", flag, message)


def config_from_args(args) -> object:
    """`--config` (if any) with every config flag that was given laid over it; fields map to flags by name."""
    import dataclasses

    from ..config import BlockRemovalConfig

    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(BlockRemovalConfig)}
    base = BlockRemovalConfig.from_file(args.config) if getattr(args, "config", None) else None
    config = (
        BlockRemovalConfig(**{k: v for k, v in flags.items() if v is not None})
        if base is None
        else base.replace(**flags)
    )
    _check_repair_flags(flags, config)
    return config


def _check_repair_flags(flags: dict, config) -> None:
    """A `--repair-*` flag given on the command line while the repair is off would be ignored after minutes of work:
    refuse it in one line (a config file may keep repair settings with the repair off)."""
    from ..errors import BlockCBOError

    given = [n for n in GROUPS["repair"] if n != "repair" and flags.get(n) is not None and flags.get(n) is not False]
    if given and not config.repair:
        raise BlockCBOError(f"{flag_name(given[0])} has no effect without --repair: add --repair, or drop it")


def add_model_args(parser: ArgumentParser) -> None:
    add_config_flags(parser, "model")
    parser.add_argument("--config", help="a BlockRemovalConfig JSON/YAML file; flags override its values")


def add_calibration_args(parser: ArgumentParser) -> None:
    add_config_flags(parser, "calibration")
    add_config_flags(parser, "curvature")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_selection_args(parser: ArgumentParser) -> None:
    add_config_flags(parser, "selection")


def add_solver_args(parser: ArgumentParser, remove_required: bool) -> None:
    add_config_flags(parser, "solver", required=("num_remove",) if remove_required else ())
