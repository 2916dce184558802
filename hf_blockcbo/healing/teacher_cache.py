"""Precomputed top-k teacher log-probabilities, so the teacher need not stay in memory while the student trains.

For every training sequence the teacher runs once; at each position the k most likely tokens and their
log-probabilities at the distillation temperature are kept (int32 ids + float16 log-probs: 6·k bytes per token). The
cache is one safetensors file keyed by a hash of each sequence's token ids, so dataloader shuffling, resuming and
multi-process sharding do not matter. Its metadata names the teacher, k and temperature; a cache built with other
settings is refused.

The loss against a cached teacher is the KL divergence between the two distributions coarsened to k + 1 bins (the
teacher's k tokens and "everything else"). It never exceeds the full KL and equals it when k is the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import BlockCBOError
from ..io_utils import atomic_file


logger = logging.getLogger(__name__)

FORMAT = "hf_blockcbo.teacher_topk.v1"


def sequence_key(input_ids) -> str:
    """Stable key of one unpadded token sequence."""
    ids = np.asarray(torch.as_tensor(input_ids).cpu(), dtype=np.int64)
    return hashlib.sha1(ids.tobytes()).hexdigest()


@dataclass
class TeacherTopK:
    """Top-k teacher ids [T, k] and log-probs [T, k] of many sequences, concatenated; ``spans`` maps key → (start, n)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    spans: dict[str, tuple[int, int]]
    top_k: int
    temperature: float
    teacher: str

    def lookup(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = sequence_key(input_ids)
        if key not in self.spans:
            raise BlockCBOError(
                "a training sequence is missing from the teacher cache (was it built on other data, tokenizer or "
                "max length?); delete the cache file to rebuild it"
            )
        start, n = self.spans[key]
        return self.ids[start : start + n], self.logprobs[start : start + n]

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ids/log-probs laid out like a padded batch [B, S, k] (token 0 with probability 0 at padding)."""
        b, s = input_ids.shape
        ids = torch.zeros(b, s, self.top_k, dtype=torch.long, device=input_ids.device)
        logp = torch.full((b, s, self.top_k), -1e4, device=input_ids.device)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for row in range(b):
            real = mask[row]
            row_ids, row_logp = self.lookup(input_ids[row][real])
            ids[row][real] = row_ids.to(ids.device, torch.long)
            logp[row][real] = row_logp.to(logp.device, torch.float32)
        return ids, logp

    def save(self, path: str | Path) -> None:
        meta = {
            "format": FORMAT,
            "top_k": str(self.top_k),
            "temperature": repr(self.temperature),
            "teacher": self.teacher,
            "spans": json.dumps(self.spans),
        }
        with atomic_file(path) as tmp:
            save_file({"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TeacherTopK:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise BlockCBOError(f"{path} is not a hf_blockcbo teacher cache")
        tensors = load_file(str(path))
        spans = {k: tuple(v) for k, v in json.loads(meta["spans"]).items()}
        return cls(
            tensors["ids"], tensors["logprobs"], spans, int(meta["top_k"]), float(meta["temperature"]), meta["teacher"]
        )

    def matches(self, top_k: int, temperature: float, teacher: str) -> bool:
        return self.top_k == top_k and abs(self.temperature - temperature) < 1e-12 and self.teacher == teacher


@torch.no_grad()
def build_teacher_topk(
    teacher, sequences, top_k: int, temperature: float, teacher_name: str, batch_size: int = 4, progress: bool = True
) -> TeacherTopK:
    """Run ``teacher`` once over every distinct sequence (lists of token ids) and keep its top-k log-probs."""
    if top_k < 1:
        raise BlockCBOError(f"teacher top-k must be ≥ 1, got {top_k}")
    unique: dict[str, list[int]] = {}
    for seq in sequences:
        unique.setdefault(sequence_key(seq), list(seq))
    if not unique:
        raise BlockCBOError("no training sequences to cache teacher logits for")
    keys = sorted(unique, key=lambda k: len(unique[k]))  # similar lengths per batch: little padding
    device = next(teacher.parameters()).device
    ids_parts, logp_parts, spans, offset = [], [], {}, 0
    was_training = teacher.training
    teacher.eval()
    for i in tqdm(range(0, len(keys), batch_size), desc="teacher top-k", disable=not progress):
        chunk = keys[i : i + batch_size]
        lengths = [len(unique[k]) for k in chunk]
        width = max(lengths)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, key in enumerate(chunk):
            input_ids[row, : lengths[row]] = torch.tensor(unique[key])
            mask[row, : lengths[row]] = 1
        logits = teacher(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        k = min(top_k, logits.shape[-1])
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        values, indices = logp.topk(k, dim=-1)
        for row, key in enumerate(chunk):
            n = lengths[row]
            ids_parts.append(indices[row, :n].to("cpu", torch.int32))
            logp_parts.append(values[row, :n].to("cpu", torch.float16))
            spans[key] = (offset, n)
            offset += n
    teacher.train(was_training)
    return TeacherTopK(
        torch.cat(ids_parts), torch.cat(logp_parts), spans, min(top_k, logits.shape[-1]), temperature, teacher_name
    )


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher ‖ student) over k + 1 bins per target token (labels ≠ −100, next-token aligned), mean, × T²."""
    targets = labels[:, 1:] != -100
    s = student_logits[:, :-1][targets].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    t_logp = teacher_logprobs[:, :-1][targets].float()
    t_ids = teacher_ids[:, :-1][targets]
    s_logp = F.log_softmax(s, dim=-1).gather(-1, t_ids)
    t_p = t_logp.exp()
    rest_t = (1.0 - t_p.sum(-1)).clamp(min=0.0)
    rest_s = (1.0 - s_logp.exp().sum(-1)).clamp(min=1e-12)
    kl = (t_p * (t_logp - s_logp)).sum(-1) + torch.special.xlogy(rest_t, rest_t) - rest_t * rest_s.log()
    return kl.mean() * temperature**2
