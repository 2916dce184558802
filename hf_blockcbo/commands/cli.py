"""`hf-blockcbo` entry point: `hf-blockcbo {calibrate,solve,prune,compare,eval,bench,...} ...` (also `python -m hf_blockcbo.commands.cli`)."""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from .base import BaseCommand
from .calibrate import CalibrateCommand
from .compare import CompareCommand
from .diagnose import DiagnoseCommand
from .evaluate import BenchCommand, EvalCommand
from .heal import HealCommand
from .prune import PruneCommand
from .push import PushCommand
from .solve import SolveCommand


COMMANDS: list[type[BaseCommand]] = [
    CalibrateCommand,
    SolveCommand,
    PruneCommand,
    CompareCommand,
    DiagnoseCommand,
    EvalCommand,
    BenchCommand,
    HealCommand,
    PushCommand,
]


def build_parser(prog: str = "hf-blockcbo") -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog, description="Remove transformer blocks chosen by constrained binary optimization."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.COMMAND.name, help=command.COMMAND.help, description=command.COMMAND.help)
        command.parse_args(sub)
        sub.set_defaults(command_class=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse printed its one line (or the help): return its code, do not exit
        return int(stop.code or 0)
    if getattr(args, "command_class", None) is None:
        parser.print_help()
        return 2
    from ..errors import BlockCBOError

    try:
        return args.command_class(args).run()
    except BlockCBOError as err:
        from .base import to_flags

        print(f"hf-blockcbo {args.command}: error: {to_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-blockcbo {args.command}: interrupted; {_what_was_kept(args)}", file=sys.stderr)
        return 130


def _what_was_kept(args) -> str:
    """An interrupted run writes no output, but a calibration keeps its resume file(s): name them."""
    from pathlib import Path

    output = getattr(args, "output", None)
    if not isinstance(output, str) or not output:
        return "nothing was written"
    out = Path(output)
    kept = sorted(str(p) for p in out.parent.glob(out.name + ".partial*"))
    if not kept:
        return "nothing was written"
    return (
        f"no output was written; the rows done so far are kept in {', '.join(kept)}: rerun the same command to resume"
    )


if __name__ == "__main__":
    sys.exit(main())
