"""Healing by distillation (TRL SFTTrainer with a KD loss) on a tiny model: KL goes down; kill and resume works."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_blockcbo.commands.cli import main
from hf_blockcbo.healing import distillation_loss


def _kl_to_teacher(student_dir, teacher_dir, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    from hf_blockcbo.data import build_calibration_set

    held_out = build_calibration_set(tokenizer, "embedded:test", num_samples=8, seq_len=32)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    labels = held_out.input_ids.clone()
    with torch.no_grad():
        return float(distillation_loss(student(held_out.input_ids).logits, teacher(held_out.input_ids).logits, labels))


@pytest.fixture
def student(tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    assert main(["prune", "--model", str(tiny_model_dir), "--blocks", "1,4", "--output", str(out)]) == 0
    return out


HEAL = ["--learning-rate", "3e-3", "--heal-batch-size", "4", "--max-length", "64", "--save-steps", "10"]


def test_distillation_lowers_the_kl_to_the_teacher(student, tiny_model_dir, tokenizer, tmp_path):
    before = _kl_to_teacher(student, tiny_model_dir, tokenizer)
    out = tmp_path / "healed"
    code = main(
        [
            "heal",
            "--student",
            str(student),
            "--teacher",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--max-steps",
            "40",
            *HEAL,
        ]
    )
    assert code == 0
    after = _kl_to_teacher(out, tiny_model_dir, tokenizer)
    assert after < 0.8 * before, (before, after)
    provenance = json.loads((out / "block_removal.json").read_text())
    healing = provenance["healing"]
    assert healing["steps"] == 40 and healing["teacher"] == str(tiny_model_dir)
    assert healing["validation_perplexity_after"] < healing["validation_perplexity_before"]
    assert provenance["removed_blocks"] == [1, 4], "the pruning provenance is kept"
    assert not (tmp_path / "healed.checkpoints").exists()


def test_killed_healing_resumes_from_its_checkpoint(student, tiny_model_dir, tmp_path):
    out = tmp_path / "healed"
    cmd = [
        sys.executable,
        "-m",
        "hf_blockcbo.cli",
        "heal",
        "--student",
        str(student),
        "--teacher",
        str(tiny_model_dir),
        "--output",
        str(out),
        "--max-steps",
        "20",
        *HEAL,
    ]
    killed = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_BLOCKCBO_ABORT_AFTER_STEP": "10"}
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (tmp_path / "healed.checkpoints" / "checkpoint-10").is_dir() and not out.exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    healing = json.loads((out / "block_removal.json").read_text())["healing"]
    assert healing["resumed_from"] == "checkpoint-10" and healing["steps"] == 20


def test_distillation_loss_only_counts_target_tokens():
    student = torch.randn(1, 5, 7)
    teacher = student.clone()
    teacher[0, 3, 2] += 5.0  # differs only at the position whose target is masked
    labels = torch.tensor([[1, 2, 3, 4, -100]])
    assert float(distillation_loss(student, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    assert float(distillation_loss(student, teacher, labels)) > 0


def test_four_bit_teacher_needs_cuda():
    from hf_blockcbo.errors import BlockCBOError
    from hf_blockcbo.healing import load_teacher

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the NF4 path is exercised on GPU machines")
    with pytest.raises(BlockCBOError, match="CUDA"):
        load_teacher("anything", four_bit=True)
