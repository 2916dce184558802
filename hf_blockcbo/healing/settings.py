"""`HealSettings`: the healing knobs every face exposes, with the paper's defaults written once.

Torch-free (so `hf-blockcbo --help` stays instant): the CLI generates its healing flags from these fields' metadata,
and :class:`hf_blockcbo.healing.trainer.HealConfig` (a `trl.SFTConfig`) takes its defaults from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class HealSettings:
    """Healing settings with the paper's defaults (lr 2e-5, cosine, warm-up 100, weight decay 1e-4, clip 1.0, 1024
    tokens, one epoch)."""

    max_steps: int = field(default=-1, metadata={"help": "Training steps (-1: one epoch)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Paper: 2e-5."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Per-device batch size."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per training sample (paper: 1024)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation KL."})
    alpha_ce: float = field(default=0.0, metadata={"help": "Weight of the data cross-entropy (1 − weight on the KL)."})
    teacher_top_k: int = field(
        default=0,
        metadata={"help": "Cache the teacher's top-k log-probs once and free the teacher (0: live teacher)."},
    )
    assistant_only_loss: bool = field(default=False, metadata={"help": "Chat data: distil on assistant tokens only."})
    keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "CPU with glibc: keep freed memory in the process between steps instead of faulting it back in "
            "each step (process-wide; see benchmarks/heal_allocator.py)."
        },
    )
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps (a rerun resumes)."})
    seed: int = field(default=0, metadata={"help": "Training seed."})
    # paper defaults that are not flags
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_steps: int = field(default=100, metadata={"help": "Paper: 100 (cut to 10% of short runs)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Paper: 1e-4."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Paper: 1.0."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Paper: one epoch."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the fields shown as CLI flags, and the one table of flags whose name is not the field's
HEAL_FLAG_FIELDS = (
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "max_length",
    "temperature",
    "alpha_ce",
    "teacher_top_k",
    "assistant_only_loss",
    "keep_freed_memory",
    "save_steps",
    "seed",
)
HEAL_FLAG_NAMES = {
    "per_device_train_batch_size": "--heal-batch-size",
    "assistant_only_loss": "--assistant-only",
    "seed": "--heal-seed",
}


def heal_default(name: str):
    """The default of one `HealSettings` field (for `HealConfig`'s own fields)."""
    return {f.name: f.default for f in dataclasses.fields(HealSettings)}[name]


def heal_help(name: str) -> dict:
    return dict({f.name: f.metadata for f in dataclasses.fields(HealSettings)}[name])
