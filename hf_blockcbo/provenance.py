"""`Provenance`: what a pruned folder's ``block_removal.json`` records — one type for prune, heal, callback, Space,
card and push, so every face writes (and every reader finds) the same keys."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BlockCBOError


PROVENANCE_FILE = "block_removal.json"


@dataclass
class Provenance:
    """The record of one block removal.

    Args:
        removed_blocks (`list[int]`): 0-based indices of the removed blocks, in the original numbering.
        num_blocks_before / num_blocks_after, num_parameters_before / num_parameters_after (`int`): sizes.
        model, revision, base_model, note: where the model came from (`ModelSource`).
        scorer, selection, energy, rank, solver, spectrum: how the blocks were chosen.
        validation_perplexity, validation_data, validation_perplexity_unpruned: the selection's evidence.
        merged_into (`int`, *optional*): sliding-window merging's target block.
        config (`dict`): the `BlockRemovalConfig`; calibration (`dict`): the artifact's metadata.
        repair (`dict`, *optional*): the training-free repair folded into the weights (kind, ridge, tokens, each
            run's fit error before/after, the validation perplexity without and with it), `None` when not repaired.
            A repair its validation check did not fold is kept under ``repair_rejected`` (in ``extra``).
        extra (`dict`): later additions (healing, evaluations, ...), kept at the top level of the JSON.
    """

    removed_blocks: list[int]
    num_blocks_before: int
    num_blocks_after: int
    num_parameters_before: int
    num_parameters_after: int
    model: str | None = None
    revision: str | None = None
    base_model: str | None = None
    note: str = ""
    scorer: str = "cbo"
    selection: str = ""
    energy: float | None = None
    rank: int | None = None
    solver: dict | None = None
    spectrum: list[dict] | None = None
    validation_perplexity: float | None = None
    validation_data: str | None = None
    validation_perplexity_unpruned: float | None = None
    merged_into: int | None = None
    config: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    repair: dict | None = None
    package: str = "hf_blockcbo"
    package_version: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.package_version:
            from ._version import __version__

            self.package_version = __version__

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**values, **self.extra}

    @classmethod
    def from_dict(cls, values: dict, where: str = "provenance") -> Provenance:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name in names]
        required = [n for n in required if f"{n}" not in ("config", "calibration")]
        missing = [n for n in required if n not in values]
        if missing:
            raise BlockCBOError(f"{where} lacks {missing}; it was not written by hf-blockcbo (re-run prune)")
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, extra={k: v for k, v in values.items() if k not in names})

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Provenance:
        path = Path(model_dir) / PROVENANCE_FILE
        if not path.is_file():
            raise BlockCBOError(
                f"{str(model_dir)!r} has no {PROVENANCE_FILE}; it was not written by hf-blockcbo prune"
            )
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BlockCBOError(f"{path} is not valid JSON ({err}); re-run prune") from err
        if not isinstance(values, dict):
            raise BlockCBOError(f"{path} is not a JSON object; re-run prune")
        return cls.from_dict(values, where=str(path))
