"""`optimum-cli blockcbo <subcommand>`: every hf-blockcbo command under optimum-cli (PEP 420 namespace, no __init__)."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


def _wrap(command_cls):
    class OptimumAdapter(BaseOptimumCLICommand):
        COMMAND = CommandInfo(command_cls.COMMAND.name, help=command_cls.COMMAND.help)

        @staticmethod
        def parse_args(parser):
            command_cls.parse_args(parser)

        def run(self):
            import sys

            from hf_blockcbo.errors import BlockCBOError

            try:
                return command_cls(self.args).run()
            except BlockCBOError as err:
                print(f"optimum-cli blockcbo {command_cls.COMMAND.name}: error: {err}", file=sys.stderr)
                sys.exit(2)

    OptimumAdapter.__name__ = f"BlockCBO{command_cls.__name__}"
    return OptimumAdapter


def _subcommands():
    from hf_blockcbo.commands.cli import COMMANDS

    return tuple(CommandInfo(c.COMMAND.name, help=c.COMMAND.help, subcommand_class=_wrap(c)) for c in COMMANDS)


class BlockCBOCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="blockcbo", help="remove transformer blocks chosen by constrained binary optimization")
    SUBCOMMANDS = _subcommands()


REGISTER_COMMANDS = [BlockCBOCommand]
