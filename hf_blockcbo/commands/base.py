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
        from ..config import BlockRemovalConfig

        base = BlockRemovalConfig.from_file(self.args.config) if getattr(self.args, "config", None) else None
        flags = {
            "model": getattr(self.args, "model", None),
            "revision": getattr(self.args, "revision", None),
            "dtype": getattr(self.args, "dtype", None),
            "data": getattr(self.args, "data", None),
            "num_samples": getattr(self.args, "num_samples", None),
            "seq_len": getattr(self.args, "seq_len", None),
            "batch_size": getattr(self.args, "batch_size", None),
            "packing": getattr(self.args, "packing", None),
            "gate": getattr(self.args, "gate", None),
            "beta": getattr(self.args, "beta", None),
            "num_remove": getattr(self.args, "remove", None),
            "top_k": getattr(self.args, "top_k", None),
            "solver": getattr(self.args, "solver", None),
            "scorer": getattr(self.args, "scorer", None),
            "select": getattr(self.args, "select", None),
            "validation_data": getattr(self.args, "validation_data", None),
            "validation_samples": getattr(self.args, "validation_samples", None),
            "protected": parse_int_list(getattr(self.args, "protect", None)),
            "per_kind": parse_per_kind_flag(getattr(self.args, "per_kind", None)),
            "param_budget": getattr(self.args, "param_budget", None),
            "seed": getattr(self.args, "seed", None),
            "time_limit": getattr(self.args, "time_limit", None),
            "rank": getattr(self.args, "rank", None),
            "blocks": parse_int_list(getattr(self.args, "blocks", None)),
        }
        if base is None:
            return BlockRemovalConfig(**{k: v for k, v in flags.items() if v is not None})
        return base.replace(**flags)


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


def add_model_args(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="Hub id, local folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    group.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype (default auto)"
    )
    group.add_argument("--config", help="a BlockRemovalConfig JSON/YAML file; flags override its values")


def add_calibration_args(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--data", help=".txt / .jsonl (text or chat messages) / datasets id (default: embedded sample)")
    group.add_argument("--num-samples", type=int, help="calibration samples (default 128; the paper uses 2048)")
    group.add_argument("--seq-len", type=int, help="tokens per sample (default 256)")
    group.add_argument("--batch-size", type=int, help="samples per forward/backward (default 8)")
    group.add_argument("--packing", choices=["auto", "pack", "truncate"], help="how texts become samples")
    group.add_argument("--gate", choices=["auto", "branch", "layer"], help="gate kind (default auto = branch)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_selection_args(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("selection")
    group.add_argument(
        "--select", choices=["validation", "energy"], help="pick the CBO state by validation ppl (default)"
    )
    group.add_argument("--validation-data", help="held-out data for selection (default: embedded validation split)")
    group.add_argument("--validation-samples", type=int, help="validation samples (default 32)")


def add_solver_args(parser: ArgumentParser, remove_required: bool, solver_flag: str = "--solver") -> None:
    group = parser.add_argument_group("solver")
    group.add_argument("--remove", type=int, required=remove_required, help="K, the number of blocks to remove")
    group.add_argument("--top-k", type=int, help="lowest-energy states to compute (default 10)")
    group.add_argument(
        solver_flag, dest="solver", help="solver: auto, exact, bnb (certified branch and bound), tabu or torch"
    )
    group.add_argument("--protect", help="blocks never removed, e.g. 0,29")
    group.add_argument("--per-kind", help="exact count per block kind, e.g. attention=2,moe=1 (hybrid models)")
    group.add_argument("--param-budget", type=float, help="remove at least this %% of the parameters (exact solver)")
    group.add_argument("--beta", type=float, help="weight of the first-order term (default 0, as in the paper)")
    group.add_argument("--seed", type=int, help="seed of the stochastic solvers")
    group.add_argument("--time-limit", type=float, help="solver time limit in seconds")
