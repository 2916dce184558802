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

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from .architectures import count_parameters, describe_blocks, get_architecture
from .calibration import _check_finite, frozen_eval, gate_gradients_for_batch
from .config import BlockRemovalConfig
from .errors import BlockCBOError
from .gates import BlockGates, resolve_gate_kind
from .hessian import HessianArtifact
from .removal import remove_blocks


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
        self.at = at
        self.every_steps = every_steps
        self.remove_at_step = remove_at_step
        self.max_batches = max_batches
        self.use_train_data = use_train_data
        self.artifact: HessianArtifact | None = None
        self.removed: list[int] | None = None

    # -- the Hessian pass ---------------------------------------------------------------------------------------
    def _dataloader(self, kwargs):
        loader = kwargs.get("train_dataloader") if self.use_train_data else kwargs.get("eval_dataloader")
        loader = loader or kwargs.get("train_dataloader")
        if loader is None:
            raise BlockCBOError("the trainer passed no dataloader to the callback; give the trainer an eval_dataset")
        return loader

    def _batches(self, dataloader, rank: int, world: int, batch_size: int):
        """(first sample index, batches) of this process's contiguous shard of the loader's samples.

        Accelerate's prepared loaders pad the last shard with repeated samples and interleave batches across
        processes; with a map-style dataset the callback instead shards the samples by index itself (uneven shards,
        no duplicates), so the gathered rows are in sample order and equal the single-process rows.
        """
        from torch.utils.data import DataLoader

        from .distributed import shard_bounds

        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            if world > 1:
                raise BlockCBOError("multi-process Hessian passes need a map-style (sized) eval/train dataset")
            return 0, iter(dataloader)
        total = len(dataset)
        if self.max_batches is not None:
            total = min(total, self.max_batches * batch_size * world)
        start, stop = shard_bounds(total, rank, world)
        subset = torch.utils.data.Subset(dataset, range(start, stop))
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=dataloader.collate_fn)
        return start, iter(loader)

    def compute(self, args, model, dataloader) -> HessianArtifact:
        from accelerate import PartialState

        from . import __version__
        from .distributed import gather_rows

        state = PartialState()
        spec = get_architecture(model)
        gate = resolve_gate_kind(spec, self.config.gate)
        blocks = describe_blocks(model, spec)
        names = [b.name for b in blocks]
        rows, losses = [], []
        batch_size = getattr(dataloader, "batch_size", None) or args.per_device_eval_batch_size
        start, batches = self._batches(dataloader, state.process_index, state.num_processes, batch_size)
        seen = start  # sample index, for error messages
        device = next(model.parameters()).device
        with frozen_eval(model), BlockGates(model, gate=gate) as gates:
            for number, batch in enumerate(batches):
                if self.max_batches is not None and number >= self.max_batches:
                    break
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                grad, loss = gate_gradients_for_batch(model, gates, ids, mask)
                _check_finite(grad, seen, names)
                seen += grad.shape[0]
                rows.append(grad.cpu())
                losses.append(loss.cpu())
        A = torch.cat(rows) if rows else torch.zeros(0, len(names))
        loss = torch.cat(losses) if losses else torch.zeros(0)
        if state.num_processes > 1:
            A, loss = gather_rows(start, A, loss)
        if A.shape[0] == 0:
            raise BlockCBOError("the callback's dataloader gave no batch")
        artifact = HessianArtifact(
            A=A,
            block_names=names,
            block_kinds=[b.kind for b in blocks],
            block_num_parameters=[b.num_parameters for b in blocks],
            losses=loss,
            metadata={
                "model": str(getattr(model.config, "_name_or_path", "")),
                "dataset": "trainer dataloader",
                "num_samples": str(A.shape[0]),
                "gate": gate,
                "num_processes": str(state.num_processes),
                "num_parameters": str(count_parameters(model)),
                "package_version": __version__,
            },
        )
        self.artifact = artifact
        if state.is_main_process:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            artifact.save(out / "hessian.safetensors")
            if self.config.num_remove:
                from .pipeline import solve_artifact

                result = solve_artifact(artifact, self.config)
                payload = [c.to_dict() for c in result.candidates]
                (out / "candidates.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        state.wait_for_everyone()
        return artifact

    # -- removal during training --------------------------------------------------------------------------------
    def _remove(self, model, optimizer) -> None:
        from .pipeline import solve_artifact

        if self.config.num_remove is None:
            raise BlockCBOError("remove_at_step needs config.num_remove")
        blocks = list(solve_artifact(self.artifact, self.config).candidates[0].blocks)
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
