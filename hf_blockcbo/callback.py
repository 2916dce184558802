"""`BlockRemovalCallback`: the Hessian pass (and optionally the removal) inside a transformers / TRL training run.

```python
from hf_blockcbo import BlockRemovalCallback, BlockRemovalConfig

callback = BlockRemovalCallback(BlockRemovalConfig(num_remove=4), at="train_end")
trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[callback])
trainer.train()  # writes <output_dir>/hessian.safetensors (+ candidates.json)
```

With ``remove_at_step=S`` the solved blocks are removed at step S and training continues on the shallower model
(the optimizer's parameter groups and state are rebuilt without the removed parameters). Under multi-process
training every process computes the rows of its shard of the dataset, the rows are gathered in sample order, and
all processes remove the same blocks; DDP then needs ``ddp_find_unused_parameters=True``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import BlockRemovalConfig
from .errors import BlockCBOError
from .hessian.artifact import HessianArtifact
from .surgery.removal import check_removal, remove_blocks


logger = logging.getLogger(__name__)
EVENTS = ("train_begin", "steps", "train_end")


class BlockRemovalCallback(TrainerCallback):
    """Computes the Hessian artifact through the trainer's own dataloader and Accelerate state.

    Args:
        config (`BlockRemovalConfig`, *optional*): solver and gate settings (`num_remove`, `top_k`, `gate`, ...).
        at (`str`, defaults to `"train_end"`): `"train_begin"`, `"steps"` (every `every_steps`) or `"train_end"`.
        every_steps (`int`, *optional*): with `at="steps"`.
        remove_at_step (`int`, *optional*): remove the ground-state blocks at this global step and keep training.
        max_batches (`int`, *optional*): batches of the dataloader to use (default: all of it).
        use_train_data (`bool`, defaults to `False`): use the training dataloader instead of the evaluation one.
    """

    def __init__(
        self,
        config: BlockRemovalConfig | None = None,
        at: str = "train_end",
        every_steps: int | None = None,
        remove_at_step: int | None = None,
        max_batches: int | None = None,
        use_train_data: bool = False,
    ):
        if at not in EVENTS:
            raise BlockCBOError(f"at must be one of {EVENTS}, got {at!r}")
        if at == "steps" and not every_steps:
            raise BlockCBOError("at='steps' needs every_steps")
        self.config = config or BlockRemovalConfig()
        if self.config.repair_data:
            raise BlockCBOError(
                "the callback fits its repair on the trainer's batches, the ones it calibrates on; `repair_data` is "
                "read by prune, compare and the Python API: leave it unset here"
            )
        self.at = at
        self.every_steps = every_steps
        self.remove_at_step = remove_at_step
        self.max_batches = max_batches
        self.use_train_data = use_train_data
        self.artifact: HessianArtifact | None = None
        self.calibration = None  # the samples of the last Hessian pass (also what config.repair fits on)
        self.removed: list[int] | None = None
        self.repair: dict | None = None
        self.rounds: list[dict] | None = None  # the rounds of re-expansion run before the cut (measured_rounds)
        self.ground_lead: dict | None = None  # the cut state's lead over its runner-up (pipeline.ground_lead)

    # -- the Hessian pass ---------------------------------------------------------------------------------------
    def _dataloader(self, kwargs):
        loader = kwargs.get("train_dataloader") if self.use_train_data else kwargs.get("eval_dataloader")
        loader = loader or kwargs.get("train_dataloader")
        if loader is None:
            raise BlockCBOError("the trainer passed no dataloader to the callback; give the trainer an eval_dataset")
        return loader

    def _samples(self, dataloader, world: int, batch_size: int):
        """The loader's samples as one `CalibrationSet` (right-padded to the longest), in dataset order.

        Accelerate's prepared loaders pad the last shard with repeated samples and interleave batches across
        processes; with a map-style dataset the callback instead reads the samples by index with the trainer's
        collator, and the pipeline shards them by index (uneven shards, no duplicates), so the gathered rows are in
        sample order and equal the single-process rows.
        """
        from torch.utils.data import DataLoader

        from .data import CalibrationSet

        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            if world > 1:
                raise BlockCBOError("multi-process Hessian passes need a map-style (sized) eval/train dataset")
            batches = iter(dataloader)
        else:
            total = len(dataset)
            if self.max_batches is not None:
                total = min(total, self.max_batches * batch_size * world)
            subset = torch.utils.data.Subset(dataset, range(total))
            batches = iter(DataLoader(subset, batch_size=batch_size, collate_fn=dataloader.collate_fn))
        ids, masks = [], []
        for number, batch in enumerate(batches):
            if self.max_batches is not None and world == 1 and number >= self.max_batches:
                break
            ids.append(batch["input_ids"].cpu())
            mask = batch.get("attention_mask")
            masks.append(torch.ones_like(ids[-1]) if mask is None else mask.cpu())
        if not ids:
            raise BlockCBOError("the callback's dataloader gave no batch")
        width = max(t.shape[1] for t in ids)
        input_ids = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ids])
        attention_mask = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in masks])
        return CalibrationSet(input_ids, attention_mask, "trainer dataloader")

    def compute(self, args, model, dataloader) -> HessianArtifact:
        """The artifact of ``config`` over the loader's samples, by the same pipeline as `hf-blockcbo calibrate`."""
        from accelerate import PartialState

        from .models import ModelSource
        from .pipeline import calibrate

        state = PartialState()
        batch_size = getattr(dataloader, "batch_size", None) or args.per_device_eval_batch_size
        calibration = self._samples(dataloader, state.num_processes, batch_size)
        name = str(getattr(model.config, "_name_or_path", "") or "")
        source = ModelSource(model_id=name, revision=None, base_model=None, path=name)
        config = self.config.replace(batch_size=batch_size)
        artifact = calibrate(model, None, config, source, progress=False, calibration=calibration)
        self.artifact = artifact
        self.calibration = calibration
        if state.is_main_process:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            artifact.save(out / "hessian.safetensors")
            if self.config.num_remove:
                from .pipeline import solve_artifact, write_candidates

                write_candidates(solve_artifact(artifact, self.config), out / "candidates.json", artifact)
        state.wait_for_everyone()
        return artifact

    # -- removal during training --------------------------------------------------------------------------------
    def _remove(self, model, optimizer) -> None:
        from .selection.rounds import solve_with_rounds

        if self.config.num_remove is None:
            raise BlockCBOError("remove_at_step needs config.num_remove")
        # the same rounds `prune` runs, on the Hessian pass's samples
        result, self.rounds = solve_with_rounds(model, self.artifact, self.config, lambda: self.calibration, False)
        from .pipeline import ground_lead

        self.ground_lead = ground_lead(self.artifact, self.config, result, self.rounds, picked_by_energy=True)
        blocks = list(result.candidates[0].blocks)
        check_removal(model, blocks)
        if self.config.repair:  # fitted on the Hessian pass's samples, folded before the cut; training follows
            from .repair.least_squares import fit_repair, kind_before_training

            settings = self.config.repair_settings
            settings = dataclasses.replace(settings, kind=kind_before_training(model, settings.kind))
            repair = fit_repair(model, blocks, self.calibration, settings, gate=self.config.gate)
            repair.fold_into(model)
            self.repair = repair.to_dict()
        before = {id(p) for p in model.parameters()}
        remove_blocks(model, blocks)
        kept = {id(p) for p in model.parameters()}
        gone = before - kept
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            for group in inner.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in gone]
            for param in [p for p in inner.state if id(p) in gone]:
                del inner.state[param]
        self.removed = blocks
        logger.warning("removed blocks %s at this step; %d blocks remain", blocks, model.config.num_hidden_layers)

    # -- events -------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.remove_at_step is not None and args.world_size > 1 and not args.ddp_find_unused_parameters:
            # DDP's reducer keeps waiting for the removed blocks' gradients unless told some parameters go unused
            raise BlockCBOError(
                "removing blocks during multi-process training needs TrainingArguments(ddp_find_unused_parameters="
                "True); or remove after training (remove_at_step=None) and prune with `hf-blockcbo prune --hessian`"
            )
        if self.remove_at_step is not None and self.config.repair and model is not None:
            # a family whose repair (or refit depth) cannot fold is refused before any step, not at the cut
            from .repair.least_squares import check_repairable, kind_before_training

            settings = self.config.repair_settings
            settings = dataclasses.replace(settings, kind=kind_before_training(model, settings.kind))
            check_repairable(model, [], settings=settings)
        if self.at == "train_begin" or (self.remove_at_step is not None and self.artifact is None):
            self.compute(args, model, self._dataloader(kwargs))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at == "steps" and state.global_step % self.every_steps == 0:
            self.compute(args, model, self._dataloader(kwargs))
        if self.remove_at_step is not None and state.global_step == self.remove_at_step and self.removed is None:
            self._remove(model, optimizer)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at == "train_end":
            self.compute(args, model, self._dataloader(kwargs))
