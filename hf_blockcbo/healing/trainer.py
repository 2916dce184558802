"""Healing: knowledge distillation from the unpruned teacher into the pruned student, built on TRL's SFTTrainer.

The loss is the forward KL between the teacher's and the student's next-token distributions at temperature T
(scaled by T²), optionally mixed with the cross-entropy on the data (``alpha_ce``), over the tokens the collator marks
as targets: every token for text, only the assistant's for chat when ``assistant_only_loss`` is set. TRL does the
data handling (text or chat templates, truncation), Accelerate integration, checkpoints and resume; only the loss is
ours. Defaults follow the paper (lr 2e-5, cosine, warm-up 100 steps, weight decay 1e-4, clip 1.0, max length 1024,
one epoch), with the warm-up cut to a tenth of the run when the run is short.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from ..errors import BlockCBOError
from ..io_utils import atomic_dir, check_output_dir
from ..surgery.architectures import get_architecture
from ..surgery.removal import PROVENANCE_FILE
from .allocator import keep_freed_memory
from .settings import heal_default, heal_help


logger = logging.getLogger(__name__)


@dataclass
class HealConfig(SFTConfig):
    """`trl.SFTConfig` with the paper's distillation defaults and the distillation knobs (defaults from
    :class:`hf_blockcbo.healing.settings.HealSettings`, where they are written once)."""

    learning_rate: float = field(default=heal_default("learning_rate"), metadata=heal_help("learning_rate"))
    lr_scheduler_type: str = field(default=heal_default("lr_scheduler_type"), metadata=heal_help("lr_scheduler_type"))
    warmup_steps: int = field(default=heal_default("warmup_steps"), metadata=heal_help("warmup_steps"))
    weight_decay: float = field(default=heal_default("weight_decay"), metadata=heal_help("weight_decay"))
    max_grad_norm: float = field(default=heal_default("max_grad_norm"), metadata=heal_help("max_grad_norm"))
    max_length: int | None = field(default=heal_default("max_length"), metadata=heal_help("max_length"))
    num_train_epochs: float = field(default=heal_default("num_train_epochs"), metadata=heal_help("num_train_epochs"))
    max_steps: int = field(default=heal_default("max_steps"), metadata=heal_help("max_steps"))
    per_device_train_batch_size: int = field(
        default=heal_default("per_device_train_batch_size"), metadata=heal_help("per_device_train_batch_size")
    )
    save_steps: float = field(default=heal_default("save_steps"), metadata=heal_help("save_steps"))
    seed: int = field(default=heal_default("seed"), metadata=heal_help("seed"))
    temperature: float = field(default=heal_default("temperature"), metadata=heal_help("temperature"))
    alpha_ce: float = field(default=heal_default("alpha_ce"), metadata=heal_help("alpha_ce"))
    teacher_top_k: int = field(default=heal_default("teacher_top_k"), metadata=heal_help("teacher_top_k"))
    keep_freed_memory: bool = field(default=heal_default("keep_freed_memory"), metadata=heal_help("keep_freed_memory"))
    report_to: list[str] | str | None = field(default="none", metadata={"help": "Loggers (default none)."})

    def __post_init__(self):
        if not 0.0 <= self.alpha_ce <= 1.0:
            raise BlockCBOError(f"alpha_ce must be in [0, 1], got {self.alpha_ce}")
        if self.temperature <= 0:
            raise BlockCBOError(f"temperature must be positive, got {self.temperature}")
        if self.teacher_top_k < 0:
            raise BlockCBOError(f"teacher_top_k must be ≥ 0, got {self.teacher_top_k}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise BlockCBOError(f"max_steps must be positive (or -1: one epoch), got {self.max_steps}")
        if self.teacher_top_k and (self.packing or self.padding_free):
            raise BlockCBOError("a cached teacher needs one sequence per row: turn packing / padding_free off")
        if 0 < self.max_steps < 10 * self.warmup_steps:
            self.warmup_steps = max(1, self.max_steps // 10)
        if not torch.cuda.is_available():
            # TRL defaults to bf16 autocast and activation checkpointing; on a CPU without native bf16 the autocast
            # is emulated (measured ~50x slower on SmolLM2), so train in the model's own dtype
            self.bf16 = False
            self.fp16 = False
            self.gradient_checkpointing = False
        if getattr(self, "activation_checkpointing", False) is None:  # transformers ≥ 5 renamed it; no alias warning
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        super().__post_init__()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per target token (labels ≠ −100, next-token aligned), mean over tokens, × T²."""
    targets = labels[:, 1:] != -100
    s = student_logits[:, :-1][targets].float() / temperature
    t = teacher_logits[:, :-1][targets].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


class DistillationSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is distillation from ``teacher`` (frozen, eval mode, placed by Accelerate).

    With ``args.teacher_top_k`` > 0 the teacher runs once over the tokenised training set before training; its top-k
    log-probs are cached (``teacher_cache`` file, reused when it matches) and the teacher is dropped. ``teacher`` may
    be a model or a zero-argument loader, so a matching cache spares loading the teacher at all.
    """

    def __init__(self, *args, teacher=None, teacher_name: str = "teacher", teacher_cache=None, **kwargs):
        if teacher is None:
            raise BlockCBOError("distillation needs a teacher model")
        super().__init__(*args, **kwargs)
        self.teacher_topk = None
        if self.args.teacher_top_k:
            self.teacher_topk = self._teacher_topk(teacher, teacher_name, teacher_cache)
            teacher = None
        else:
            teacher = _materialise(teacher)
        if (
            teacher is not None
            and getattr(teacher, "hf_quantizer", None) is None
            and getattr(teacher, "hf_device_map", None) is None
        ):
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.teacher = teacher
        self._kd_log: list[float] = []

    def _teacher_topk(self, teacher, teacher_name: str, cache_path):
        from .teacher_cache import TeacherTopK, build_teacher_topk

        k, temperature = self.args.teacher_top_k, self.args.temperature
        cache_path = Path(cache_path or Path(self.args.output_dir) / f"teacher_top{k}.safetensors")
        if cache_path.is_file():
            cached = TeacherTopK.load(cache_path)
            if cached.matches(k, temperature, teacher_name):
                logger.info("using the cached teacher top-%d log-probs in %s", k, cache_path)
                return cached
            raise BlockCBOError(
                f"{cache_path} was built for another teacher, k or temperature ({cached.teacher}, k={cached.top_k}, "
                f"T={cached.temperature}); delete it or choose another --teacher-cache"
            )
        if self.accelerator.is_main_process:
            teacher = _materialise(teacher)
            if getattr(teacher, "hf_quantizer", None) is None and getattr(teacher, "hf_device_map", None) is None:
                teacher = teacher.to(self.accelerator.device)  # quantised / dispatched teachers are placed already
            built = build_teacher_topk(
                teacher,
                self.train_dataset["input_ids"],
                k,
                temperature,
                teacher_name,
                batch_size=self.args.per_device_train_batch_size,
            )
            built.save(cache_path)
        self.accelerator.wait_for_everyone()
        return TeacherTopK.load(cache_path)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        outputs = model(**forward, use_cache=False)
        args = self.args
        if self.teacher_topk is not None:
            from .teacher_cache import topk_distillation_loss

            ids, logp = self.teacher_topk.batch(inputs["input_ids"], inputs.get("attention_mask"))
            kd = topk_distillation_loss(outputs.logits, ids, logp, labels, args.temperature)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(**forward, use_cache=False).logits
            kd = distillation_loss(outputs.logits, teacher_logits, labels, args.temperature)
        loss = kd
        if args.alpha_ce > 0:
            ce = F.cross_entropy(
                outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            loss = (1 - args.alpha_ce) * kd + args.alpha_ce * ce
        self._kd_log.append(float(kd.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._kd_log:
            logs["kd_loss"] = sum(self._kd_log) / len(self._kd_log)
            self._kd_log.clear()
        super().log(logs, *args, **kwargs)


def _warn_about_the_start(provenance: dict, student) -> None:
    """One warning line when the student's training-free repair is not its family's start for training (Gemma: a
    `renormalised` map distilled to worse held-out text than a `diagonal` one, docs/results.md §3)."""
    kind = (provenance.get("repair") or {}).get("kind")
    start = get_architecture(student).repair_before_training
    if kind and start and kind != start:
        logger.warning(
            "this student was repaired with %s maps; for distillation its family starts better from %s ones "
            "(`prune --repair --heal` fits those, or `prune --repair --repair-kind %s`)",
            kind,
            start,
            start,
        )


def _materialise(teacher):
    """The teacher model, loading it when given as a zero-argument loader; frozen and in eval mode."""
    if not isinstance(teacher, torch.nn.Module):
        teacher = teacher()
    return teacher.eval().requires_grad_(False)


def load_teacher(teacher: str, dtype: str = "auto", four_bit: bool = False):
    """The unpruned teacher: same dtype, or 4-bit NF4 through bitsandbytes when a CUDA device exists."""
    from ..models import load_model, resolve_model

    source = resolve_model(teacher)
    if not four_bit:
        return load_model(source, dtype=dtype)[0]
    if not torch.cuda.is_available():
        raise BlockCBOError("a 4-bit NF4 teacher needs a CUDA device (bitsandbytes); drop --teacher-4bit on CPU")
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover
        raise BlockCBOError("a 4-bit teacher needs bitsandbytes: pip install bitsandbytes") from err
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(source.path, quantization_config=quant, device_map="auto")


def _dataset(records: list[dict]):
    from datasets import Dataset

    rows = [{"messages": r["messages"]} if "messages" in r else {"text": r["text"]} for r in records]
    if len({tuple(sorted(r)) for r in rows}) > 1:
        raise BlockCBOError("the healing data mixes text and chat records; use one kind")
    return Dataset.from_list(rows)


def _split_text(records: list[dict], max_chars: int) -> list[dict]:
    """Long plain-text records are cut into paragraphs-sized pieces, so a novel becomes many training samples."""
    out = []
    for record in records:
        if "messages" in record or len(record["text"]) <= max_chars:
            out.append(record)
            continue
        piece = ""
        for paragraph in record["text"].split("\n\n"):
            if piece and len(piece) + len(paragraph) > max_chars:
                out.append({"text": piece})
                piece = ""
            piece = f"{piece}\n\n{paragraph}" if piece else paragraph
        if piece:
            out.append({"text": piece})
    return out


def heal(
    student_dir: str | os.PathLike,
    teacher: str,
    data: str | None,
    output_dir: str | os.PathLike,
    args: HealConfig | None = None,
    eval_data: str | None = None,
    eval_samples: int = 32,
    teacher_4bit: bool = False,
    overwrite: bool = False,
    teacher_cache: str | os.PathLike | None = None,
) -> dict:
    """Distil ``teacher`` into the pruned ``student_dir`` and save the healed model (plain transformers folder).

    Checkpoints go to ``<output_dir>.checkpoints``; rerunning the same call resumes from the last one. The
    provenance file gains a ``healing`` entry with the settings and validation perplexity before and after. With
    ``args.teacher_top_k`` the teacher's top-k log-probs are cached (in ``teacher_cache``, kept, or in the checkpoint
    folder) and the teacher is freed before training; a resumed run reuses the cache without loading the teacher.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import build_calibration_set, embedded_documents, load_records
    from ..evaluation.likelihood import perplexity

    check_output_dir(output_dir, overwrite)
    work = Path(str(output_dir) + ".checkpoints")
    args = args or HealConfig(output_dir=str(work))
    args.output_dir = str(work)
    if args.keep_freed_memory and (args.use_cpu or not torch.cuda.is_available()):
        keep_freed_memory()
    student_dir = Path(student_dir)
    provenance_path = student_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    _warn_about_the_start(provenance, student)
    if data is None:
        records = [{"text": "\n\n".join(embedded_documents("calibration"))}]
        data_name = "embedded"
    else:
        records, data_name = load_records(data)
    chunks = _split_text(records, max_chars=4 * (args.max_length or 1024))
    if not any(str(c.get("text", c.get("messages", ""))).strip() for c in chunks):
        raise BlockCBOError(f"the healing data {data_name!r} holds no text; give a non-empty .txt / .jsonl")
    train = _dataset(chunks)
    validation = build_calibration_set(tokenizer, eval_data or "embedded:validation", eval_samples, 128)
    before = perplexity(student, validation)
    trainer = DistillationSFTTrainer(
        model=student,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        teacher=lambda: load_teacher(teacher, four_bit=teacher_4bit),
        teacher_name=teacher,
        teacher_cache=teacher_cache,
    )
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if work.is_dir() else []
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - start
    healed = trainer.model
    after = perplexity(healed, validation)
    history = [row for row in trainer.state.log_history if "loss" in row]
    provenance["healing"] = {
        "method": "knowledge distillation (forward KL)",
        "teacher": teacher,
        "teacher_4bit": teacher_4bit,
        "teacher_top_k": args.teacher_top_k or None,
        "data": data_name,
        "steps": trainer.state.global_step,
        "resumed_from": checkpoints[-1].name if checkpoints else None,
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "max_length": args.max_length,
        "temperature": args.temperature,
        "alpha_ce": args.alpha_ce,
        "assistant_only_loss": args.assistant_only_loss,
        "validation": validation.source,
        "validation_perplexity_before": before,
        "validation_perplexity_after": after,
        "train_seconds": seconds,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
    }
    provenance["validation_perplexity"] = after
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        healed.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return provenance["healing"]
