"""`BlockRemovalConfig`: one object for every setting of a block-removal run, shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BlockCBOError
from .io_utils import split_sources, write_json_atomic


CONFIG_NAME = "block_removal_config.json"

# What the repair is fitted on when neither `repair_data` nor `data` is set: the embedded novel and the embedded play
# (data.py), prose and verse drama sharing the windows. Fitted on the novel alone, the repair removed under half of the
# damage on another genre on both models; fitted on both, more than half on either (docs/results.md §3, "The default
# repair data").
DEFAULT_REPAIR_DATA = "embedded,embedded:play"


# how the repair weighs each calibration token's fit error (`repair_weighting`, used by repair/least_squares.py)
REPAIR_WEIGHTINGS = ("uniform", "relative")
# the forms a repair map can take (the registry's `repair` per family; repair/least_squares.py fits each), and the
# `repair_kind` setting's choices: `auto` is the architecture registry's choice for the family
REPAIR_KINDS = ("linear", "diagonal", "rotation", "renormalised")
REPAIR_KIND_CHOICES = ("auto", *REPAIR_KINDS)


@dataclass(frozen=True)
class RepairSettings:
    """How the repair maps are fitted: the `repair_*` knobs of `BlockRemovalConfig` other than the data, as the one
    object `fit_repair`, repair-aware selection, `compare`, the pipeline and the callback pass down (a new knob is a
    field here, on the config and in `fit_repair`, and no call site between them).

    Args:
        ridge (`float`, *optional*, defaults to 0.3): λ relative to the mean of diag(UᵀU); it shrinks the map towards
            the identity (no repair). 0.3 repaired held-out text of another domain best on SmolLM2 (docs/results.md).
            The refits of ``depth`` use the same ridge, relative to the mean of diag(XᵀX) of their own inputs.
        weighting (`str`, *optional*, defaults to ``"uniform"``): ``"uniform"`` weighs every token's error alike,
            ``"relative"`` by d / ‖g‖² (its target's scale); see repair/least_squares.py and docs/results.md §3.
        depth (`int`, *optional*): after each gap's map, refit the output projection of this many kept blocks after
            the gap (before the next gap) so each one's output stream matches the unpruned model's (repair/refit.py);
            0: the gap's map only. Unset (``None``, the default): 1 where that block's last branch ends in a dense
            projection (not behind Gemma's post-norm, not a mixture of experts), else 0; on SmolLM2 one refit added
            7-11 points of the rise removed on held-out text and made repair + 100 distillation steps match 300
            (docs/results.md §3).
        kind (`str`, *optional*, defaults to ``"auto"``): the map's form, where the family folds it (post-norm
            families: ``renormalised``, ``diagonal`` or ``rotation``); ``"auto"``: the architecture registry's choice.
    """

    ridge: float = 0.3
    weighting: str = "uniform"
    kind: str = "auto"
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.depth is not None and (
            isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0
        ):
            raise BlockCBOError(f"repair_depth must be an integer >= 0, got {self.depth!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise BlockCBOError(f"repair_ridge must be a number >= 0, got {self.ridge!r}")
        if self.weighting not in REPAIR_WEIGHTINGS:
            raise BlockCBOError(
                f"repair_weighting must be one of {', '.join(REPAIR_WEIGHTINGS)}, got {self.weighting!r}"
            )
        if self.kind not in REPAIR_KIND_CHOICES:
            raise BlockCBOError(f"repair_kind must be one of {', '.join(REPAIR_KIND_CHOICES)}, got {self.kind!r}")


@dataclass
class BlockRemovalConfig:
    """Settings of a block-removal run: which model, which calibration data, which solver, which blocks.

    ```python
    config = BlockRemovalConfig(num_remove=6, num_samples=64)
    config.save_pretrained("run/")
    BlockRemovalConfig.from_pretrained("run/")
    ```
    """

    model: str | None = field(
        default=None, metadata={"help": "Hub id, local folder or .gguf file; None: embedded SmolLM2."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16 or float16."})
    data: str | None = field(
        default=None,
        metadata={
            "help": "Calibration data: .txt, .jsonl, datasets id; None: embedded. Several sources separated by "
            "commas share the windows, interleaved (every prefix, e.g. the measured pass's, is a balanced mix)."
        },
    )
    num_samples: int = field(default=128, metadata={"help": "Calibration samples (the paper uses 2048)."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration sample."})
    batch_size: int = field(default=8, metadata={"help": "Samples per forward/backward in the Hessian pass."})
    packing: str = field(default="auto", metadata={"help": "pack, truncate, or auto (truncate chat, pack text)."})
    gate: str = field(default="auto", metadata={"help": "Gate kind: branch (paper Eq. 1-2), layer, or auto."})
    curvature: str = field(
        default="measured",
        metadata={
            "help": "Energy estimator: measured (pairwise measured KL; default, see README), fisher (model-sampled "
            "Fisher) or empirical (the paper's Eq. 6)."
        },
    )
    measured_pairs: int | None = field(
        default=14,
        metadata={"help": "measured: pairs among this many least-damaging blocks (None: all pairs)."},
    )
    measured_samples: int = field(
        default=8, metadata={"help": "measured: calibration samples the damage is averaged over."}
    )
    measured_rounds: int = field(
        default=2,
        metadata={
            "help": "measured: at most this many rounds, each re-expanding the damage around the current ground "
            "state of the chosen M and solving within `measured_round_swaps` swaps of it; they run only when "
            "`measured_round_trigger` fires and stop once the ground state stays (0: no rounds). A one-swap round "
            "costs about 0.7 of a first pass."
        },
    )
    measured_round_swaps: int = field(
        default=1,
        metadata={
            "help": "measured rounds: the trust region, 1 or 2 swaps from the centre (1: only swaps are measured, "
            "every candidate exact, a round costs about 40 % less)."
        },
    )
    measured_round_trigger: float = field(
        default=0.2,
        metadata={
            "help": "measured rounds: run them only when the first pass's energy at its ground state misses the "
            "damage measured there by more than this fraction (0: whenever measured_rounds > 0). The pairwise "
            "expansion is exact for M <= 2; a large miss means interactions of three or more blocks matter."
        },
    )
    damage: str = field(
        default="kl", metadata={"help": "measured: kl (to the unpruned model) or ce (cross-entropy increase)."}
    )
    beta: float = field(default=0.0, metadata={"help": "Weight of the first-order term (paper: 0; empirical only)."})
    num_remove: int | None = field(default=None, metadata={"help": "M, the number of blocks to remove."})
    top_k: int = field(default=10, metadata={"help": "Number of lowest-energy states to return."})
    solver: str = field(default="auto", metadata={"help": "Solver: auto, exact, bnb, tabu or torch."})
    scorer: str = field(
        default="cbo", metadata={"help": "How blocks are chosen: cbo, bi, angular, norm_ratio, sleb, swm or random."}
    )
    select: str = field(
        default="validation", metadata={"help": "Pick among the CBO states by validation perplexity, or by energy."}
    )
    validation_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out data for selection; None: the embedded validation split. Several sources separated "
            "by commas share the windows, interleaved; validate on the domains you will serve (docs/results.md §1)."
        },
    )
    validation_samples: int = field(
        default=32,
        metadata={
            "help": "Validation samples (seq_len tokens each). 32 at the default seq_len is 8192 tokens, the budget "
            "that picked best in docs/results.md §1 (64 × 128; 16 × 128 picked worse)."
        },
    )
    validation_metric: str = field(
        default="perplexity",
        metadata={
            "help": "What validation selection minimises: perplexity, or kl (mean per-token KL from the unpruned "
            "model, the damage the energy predicts); docs/results.md §1 compares them."
        },
    )
    protected: list[int] = field(default_factory=list, metadata={"help": "Blocks that are never removed."})
    per_kind: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Exact count per block kind, e.g. {'attention': 2, 'moe': 1}."}
    )
    param_budget: float = field(default=0.0, metadata={"help": "Remove at least this % of the model's parameters."})
    seed: int = field(default=0, metadata={"help": "Seed of the stochastic solvers."})
    time_limit: float | None = field(default=None, metadata={"help": "Solver time limit in seconds."})
    rank: int | None = field(
        default=None, metadata={"help": "Take this state of the spectrum (0 = ground state) instead of selecting."}
    )
    blocks: list[int] | None = field(default=None, metadata={"help": "Explicit blocks to remove (skips the solver)."})
    repair: bool = field(
        default=False,
        metadata={
            "help": "Repair without training: fit a least-squares map per removed run of blocks and fold it into "
            "the weights (README: Repair). Validation selection scores the candidates after their own repair, "
            "unless `repair_aware` is off."
        },
    )
    repair_aware: bool = field(
        default=True,
        metadata={
            "help": "With repair: score each of the top-K by validation after its own repair (fits K repairs: "
            "4-5 more minutes on a 2-core CPU for SmolLM2 or Gemma-3-270M). Off: repair the unrepaired pick. On "
            "by default: side by side in four settings it picked the same blocks in two, 5-22 % better on three "
            "test domains in one (Gemma-3-270M on maths) and 5.7 % worse on one of three in one (docs/results.md §3)."
        },
    )
    repair_samples: int = field(default=64, metadata={"help": "repair: calibration samples the maps are fitted on."})
    repair_data: str | None = field(
        default=None,
        metadata={
            "help": "repair: fit the maps on this data; several sources separated by commas share the windows "
            "evenly. None: the calibration data `data`, or, where that is the embedded novel, the novel and the "
            "embedded play (embedded,embedded:play). Fit on the domains you will serve: a map fitted on one genre "
            "repairs less of another (docs/results.md §3)."
        },
    )
    repair_ridge: float = field(
        default=RepairSettings.ridge,
        metadata={"help": "repair: ridge towards no repair, relative to the mean activation power."},
    )
    repair_weighting: str = field(
        default=RepairSettings.weighting,
        metadata={
            "help": "repair: `uniform` least squares, or `relative`: each token's fit error divided by its "
            "stream's scale (the attention sink no longer dominates the fit; helped a gap after a massive-activation "
            "block on SmolLM2, hurt Gemma-3-270M: docs/results.md §3)."
        },
    )

    repair_kind: str = field(
        default=RepairSettings.kind,
        metadata={
            "help": "repair: the map's form. `auto`: the family's (a d×d map; behind a post-norm, as in Gemma, "
            "`renormalised`). Post-norm families also take `diagonal`: a scale per channel, a weaker repair but a "
            "better start for distillation on Gemma-3-270M, so `auto` takes it where training follows (`prune "
            "--heal`, the callback's removal; docs/results.md §3)."
        },
    )
    repair_depth: int | None = field(
        default=RepairSettings.depth,
        metadata={
            "help": "repair: also refit the output projection of this many kept blocks after each gap, so that each "
            "one's output stream matches the unpruned model's (ridge least squares, folded into its weight; "
            "families whose branches end in a dense projection, not Gemma's post-norm or experts). 0: the gap's map "
            "only. Unset: 1 where the block has such a projection (+7-11 points of the rise removed on SmolLM2, "
            "docs/results.md §3), else 0."
        },
    )
    repair_check: bool = field(
        default=True,
        metadata={
            "help": "repair: before folding the repair, measure the validation perplexity (the selection's "
            "validation data) of the pruned model with and without it; a repair that does not lower it is not "
            "folded, and the model is saved unrepaired with a warning (a map fitted on one domain can hurt "
            "another: docs/results.md §3). `--no-repair-check` folds the repair unchecked and skips the "
            "validation passes. prune, the Python API and the Space check; the callback, where training follows "
            "the cut, folds its repair unchecked."
        },
    )

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("num_samples", "seq_len", "batch_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BlockCBOError(f"`{name}` must be a positive integer, got {value!r}")
        if self.num_remove is not None and (not isinstance(self.num_remove, int) or self.num_remove <= 0):
            raise BlockCBOError(f"`num_remove` must be a positive integer, got {self.num_remove!r}")
        from .hessian.curvature import available_curvatures

        if self.curvature not in available_curvatures():
            raise BlockCBOError(
                f"curvature must be one of {', '.join(available_curvatures())}, got {self.curvature!r}"
            )
        if self.damage not in ("kl", "ce"):
            raise BlockCBOError(f"damage must be 'kl' or 'ce', got {self.damage!r}")
        if self.measured_pairs is not None and (not isinstance(self.measured_pairs, int) or self.measured_pairs < 0):
            raise BlockCBOError(f"measured_pairs must be a non-negative integer or None, got {self.measured_pairs!r}")
        if not isinstance(self.measured_rounds, int) or self.measured_rounds < 0:
            raise BlockCBOError(f"measured_rounds must be a non-negative integer, got {self.measured_rounds!r}")
        trigger = self.measured_round_trigger
        if isinstance(trigger, bool) or not isinstance(trigger, (int, float)) or not 0 <= trigger < float("inf"):
            raise BlockCBOError(f"measured_round_trigger must be a fraction >= 0 (e.g. 0.1), got {trigger!r}")
        if self.measured_round_swaps not in (1, 2):
            raise BlockCBOError(f"measured_round_swaps must be 1 or 2, got {self.measured_round_swaps!r}")
        if not isinstance(self.measured_samples, int) or self.measured_samples <= 0:
            raise BlockCBOError(f"measured_samples must be a positive integer, got {self.measured_samples!r}")
        if self.beta and self.curvature != "empirical":
            raise BlockCBOError(
                f"beta weighs the data's mean gradient: only curvature 'empirical' has one, not "
                f"{self.curvature!r}; set beta to 0"
            )
        if self.select not in ("validation", "energy"):
            raise BlockCBOError(f"select must be 'validation' or 'energy', got {self.select!r}")
        if self.validation_metric not in ("kl", "perplexity"):
            raise BlockCBOError(f"validation_metric must be 'kl' or 'perplexity', got {self.validation_metric!r}")
        if not isinstance(self.validation_samples, int) or self.validation_samples <= 0:
            raise BlockCBOError(f"validation_samples must be a positive integer, got {self.validation_samples!r}")
        if self.rank is not None and self.rank < 0:
            raise BlockCBOError(f"rank must be >= 0, got {self.rank!r}")
        if self.rank is not None and self.rank >= self.top_k:
            raise BlockCBOError(
                f"rank {self.rank} is outside the top-{self.top_k} spectrum; raise top_k above {self.rank}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise BlockCBOError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise BlockCBOError(f"time_limit must be positive, got {self.time_limit!r}")
        if not 0.0 <= self.param_budget < 100.0:
            raise BlockCBOError(f"param_budget is a percentage in [0, 100), got {self.param_budget!r}")
        if any(not isinstance(v, int) or v < 0 for v in self.per_kind.values()):
            raise BlockCBOError(f"per_kind counts must be non-negative integers, got {self.per_kind!r}")
        if not isinstance(self.repair, bool):
            raise BlockCBOError(f"repair must be true or false, got {self.repair!r}")
        if (
            not isinstance(self.repair_samples, int)
            or isinstance(self.repair_samples, bool)
            or self.repair_samples <= 0
        ):
            raise BlockCBOError(f"repair_samples must be a positive integer, got {self.repair_samples!r}")
        self.repair_settings  # noqa: B018 (building it checks ridge, weighting and kind)
        for name, count in (
            ("data", "num_samples"),
            ("validation_data", "validation_samples"),
            ("repair_data", "repair_samples"),
        ):
            self._check_sources(name, count)
        fit_sources = split_sources(self.repair_fit_data)
        if self.repair_data is None and self.repair_samples < len(fit_sources):
            raise BlockCBOError(
                f"the repair fits on {self.repair_fit_data} ({len(fit_sources)} sources) but repair_samples is "
                f"{self.repair_samples}: give each source at least one window, or name the repair's data "
                "(repair_data)"
            )
        if self.blocks is not None and self.rank is not None:
            raise BlockCBOError("`blocks` names the blocks and `rank` picks a state of the spectrum: give one of them")
        if self.blocks is not None and self.num_remove is not None and len(set(self.blocks)) != self.num_remove:
            raise BlockCBOError(
                f"`blocks` lists {len(set(self.blocks))} blocks but `num_remove` is {self.num_remove}; give one of them"
            )
        self.protected = sorted({int(p) for p in self.protected})
        if self.blocks is not None:
            self.blocks = sorted({int(b) for b in self.blocks})

    def _check_types(self) -> None:
        """Each field holds its annotated type (a JSON/YAML `true` is not a sample count, `"6"` not a number)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            elif kind.startswith("list[int]"):
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                )
            elif kind.startswith("dict[str, int]"):
                ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
            else:
                ok = True
            if not ok:
                expected = kind.replace(" | None", " or null")
                raise BlockCBOError(f"`{f.name}` must be {expected}, got {value!r} ({type(value).__name__})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _check_sources(self, name: str, count_name: str) -> None:
        """A data setting names at least one source, and no more sources than the windows it shares among them."""
        value, count = getattr(self, name), getattr(self, count_name)
        if value is None:
            return
        sources = split_sources(value) if isinstance(value, str) else []
        if not sources:
            raise BlockCBOError(f"{name} must name at least one source, got {value!r}")
        if isinstance(count, int) and count < len(sources):
            raise BlockCBOError(
                f"{name} names {len(sources)} sources but {count_name} is {count}: give each source at least one "
                "window"
            )

    @property
    def repair_settings(self) -> RepairSettings:
        """How the repair maps are fitted (ridge, weighting, kind, depth), checked."""
        return RepairSettings(self.repair_ridge, self.repair_weighting, self.repair_kind, self.repair_depth)

    @property
    def repair_fit_data(self) -> str | None:
        """What the repair is fitted on: `repair_data` if set, else the calibration data `data`, except that the
        embedded default (`data` unset) fits on the novel and the embedded play (`DEFAULT_REPAIR_DATA`)."""
        if self.repair_sources:
            return self.repair_data
        if self.data is None or self.data == "embedded":
            return DEFAULT_REPAIR_DATA
        return self.data

    @property
    def repair_sources(self) -> list[str]:
        """The sources of `repair_data` (separated by commas); empty: the default (`repair_fit_data`)."""
        return split_sources(self.repair_data)

    def replace(self, **changes) -> BlockRemovalConfig:
        """A copy with ``changes`` applied (`None` values are ignored, so CLI flags left unset keep the file's value)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, values: dict) -> BlockRemovalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"package_version"})
        if unknown:
            raise BlockCBOError(f"unknown BlockRemovalConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BlockRemovalConfig:
        path = Path(path)
        if not path.is_file():
            raise BlockCBOError(f"no config file at {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except UnicodeDecodeError as err:
            raise BlockCBOError(f"the config {str(path)!r} is not UTF-8 text") from err
        except ValueError as err:  # json.JSONDecodeError
            raise BlockCBOError(f"the config {str(path)!r} is not valid JSON: {err}") from err
        except Exception as err:  # yaml.YAMLError (yaml is imported lazily)
            if type(err).__module__.startswith("yaml"):
                raise BlockCBOError(f"the config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from err
            raise
        if not isinstance(values, dict):
            raise BlockCBOError(
                f"the config {str(path)!r} must hold a mapping of field: value, not {type(values).__name__}"
            )
        return cls.from_dict(values)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from ._version import __version__

        path = Path(directory) / CONFIG_NAME
        write_json_atomic(path, {**self.to_dict(), "package_version": __version__})
        return path

    @classmethod
    def from_pretrained(cls, directory_or_repo: str | os.PathLike, revision: str | None = None) -> BlockRemovalConfig:
        """Read ``block_removal_config.json`` from a local folder first, else from a Hub repository."""
        local = Path(directory_or_repo)
        if local.is_dir():
            return cls.from_file(local / CONFIG_NAME)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            path = hf_hub_download(str(directory_or_repo), CONFIG_NAME, revision=revision)
        except (RepositoryNotFoundError, EntryNotFoundError) as err:
            raise BlockCBOError(f"no {CONFIG_NAME} in {str(directory_or_repo)!r} (local folder or Hub repo)") from err
        return cls.from_file(path)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload this config as ``block_removal_config.json`` (one commit)."""
        from huggingface_hub import CommitOperationAdd, HfApi

        from ._version import __version__

        payload = json.dumps({**self.to_dict(), "package_version": __version__}, indent=2, sort_keys=True).encode()
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operation = CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=payload)
        return api.create_commit(repo_id, [operation], commit_message="Upload BlockRemovalConfig").commit_url
