"""Distillation with a stream-matching term added to the KL, on a repaired (or plain) pruned student: tried, not kept.

    python benchmarks/stream_distillation.py --alpha 1      # SmolLM2, blocks 13-18 removed, repaired + 100 steps
    python benchmarks/stream_distillation.py --alpha 0      # the same arm with the plain KL, for the side by side

The added term is alpha × the mean over matched blocks of the relative stream error ‖h_s − h_t‖² / ‖h_t‖² per
token (position 0, the attention sink, left out): the student's stream after the kept block before the gap against
the teacher's after the gap's last block (what the repair fits), and after every later kept block against the
teacher's after the same block (``--layers gap``: the first pair only). It patches the distillation trainer's loss in
this process only; the settings are those of `benchmarks/repair.py`'s repaired + short arm (batch 2 × 128 tokens of
the embedded novel, lr 1e-4, cosine, warm-up a tenth of the steps, a live teacher). Prints one RESULT line: test
perplexity on Persuasion and As You Like It (16 windows of 128 tokens each, from `examples/offline_eval_data.py`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _models import model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import build_calibration_set
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.healing import trainer as T
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import Selection, prune_and_save
from hf_blockcbo.surgery.architectures import get_layers


def matched_blocks(removed: list[int], num_blocks: int, layers: str) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs whose output streams are matched: the kept block before the gap against
    the gap's last block, then (``layers="all"``) every later kept block against itself in the teacher."""
    kept = [i for i in range(num_blocks) if i not in removed]
    first, last = min(removed), max(removed)
    pairs = [(j, last) for j, t in enumerate(kept) if t == first - 1]
    if layers == "all":
        pairs += [(j, t) for j, t in enumerate(kept) if t > first - 1]
    return pairs


def stream_matching_loss(removed: list[int], alpha: float, layers: str):
    """A `compute_loss` for the distillation trainer: its KL (live teacher) + alpha × the relative stream error."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        labels = inputs["labels"]
        student_layers, teacher_layers = get_layers(model), get_layers(self.teacher)
        pairs = matched_blocks(removed, len(teacher_layers), layers)
        streams = {}

        def grab(key):
            def hook(module, args, output):
                streams[key] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [student_layers[j].register_forward_hook(grab(("student", j))) for j, _ in pairs]
        handles += [teacher_layers[t].register_forward_hook(grab(("teacher", t))) for _, t in pairs]
        try:
            outputs = model(**forward, use_cache=False)
            with torch.no_grad():
                teacher_logits = self.teacher(**forward, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        kd = T.distillation_loss(outputs.logits, teacher_logits, labels, self.args.temperature)
        mask = forward.get("attention_mask")
        mask = torch.ones(labels.shape, dtype=torch.bool) if mask is None else mask.bool().clone()
        mask[:, 0] = False  # the attention sink: a huge stream that the next RMS norm scales away
        errors = []
        for j, t in pairs:
            hs, ht = streams[("student", j)].float()[mask], streams[("teacher", t)].float()[mask]
            errors.append(((hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-6)).mean())
        self._kd_log.append(float(kd.detach()))
        loss = kd + alpha * torch.stack(errors).mean()
        return (loss, outputs) if return_outputs else loss

    return compute_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", default="13,14,15,16,17,18", help="the removed blocks")
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the stream term (0: the plain KL)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-repair", action="store_true", help="distil the unrepaired student")
    parser.add_argument("--layers", default="all", choices=["all", "gap"])
    parser.add_argument("--eval-dir", default="eval_data")
    args = parser.parse_args()
    removed = [int(b) for b in args.blocks.split(",")]
    if args.alpha > 0:
        T.DistillationSFTTrainer.compute_loss = stream_matching_loss(removed, args.alpha, args.layers)
    model_arg = model_argument(args.model)
    source = resolve_model(model_arg, None)
    model, tokenizer = load_model(source, dtype="float32")
    config = BlockRemovalConfig(model=model_arg, num_remove=len(removed), seq_len=128, repair_samples=64)
    tests = {
        name: build_calibration_set(tokenizer, str(Path(args.eval_dir) / file), 16, 128)
        for name, file in (("Persuasion", "austen_persuasion.txt"), ("Shakespeare", "shakespeare_as_you_like_it.txt"))
    }
    work = Path(tempfile.mkdtemp(prefix="stream_distillation_"))
    try:
        began = time.perf_counter()
        student = work / "student"
        prune_and_save(
            copy.deepcopy(model),
            tokenizer,
            Selection(removed, "given"),
            student,
            source,
            config.replace(repair=not args.no_repair),
        )
        heal_args = T.HealConfig(
            output_dir=str(work / "ckpt"),
            max_steps=args.steps,
            learning_rate=1e-4,
            per_device_train_batch_size=2,
            max_length=128,
            save_steps=10**6,
            warmup_steps=max(1, args.steps // 10),
            logging_steps=10,
        )
        T.heal(student, model_arg or "embedded:smollm2", None, work / "healed", heal_args, eval_samples=8)
        from transformers import AutoModelForCausalLM

        healed = AutoModelForCausalLM.from_pretrained(work / "healed").eval()
        row = {"alpha": args.alpha, "layers": args.layers, "steps": args.steps, "repaired": not args.no_repair}
        row["wall_s"] = time.perf_counter() - began
        for name, test in tests.items():
            row[name] = perplexity(healed, test)
        print("RESULT", json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
