"""Healing by distillation (TRL SFTTrainer with a KD loss) on a tiny model: KL goes down; kill and resume works."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_blockcbo.commands.cli import main
from hf_blockcbo.healing.trainer import distillation_loss


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
    kill_after = str(Path(__file__).with_name("kill_after.py"))  # killed right after the step-10 checkpoint
    killed = subprocess.run(
        [sys.executable, kill_after, "step", "10", *cmd], capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (tmp_path / "healed.checkpoints" / "checkpoint-10").is_dir() and not out.exists()
    resumed = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600)
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
    from hf_blockcbo.healing.trainer import load_teacher

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the NF4 path is exercised on GPU machines")
    with pytest.raises(BlockCBOError, match="CUDA"):
        load_teacher("anything", four_bit=True)


def test_topk_loss_equals_the_full_kl_when_k_is_the_vocabulary():
    from hf_blockcbo.healing.teacher_cache import topk_distillation_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, generator=gen), torch.randn(2, 6, 11, generator=gen)
    labels = torch.tensor([[1, 2, 3, -100, 5, 6], [1, 2, 3, 4, 5, -100]])
    for temperature in (1.0, 2.0):
        full = distillation_loss(student, teacher, labels, temperature)
        logp, ids = torch.log_softmax(teacher / temperature, -1).topk(11, -1)
        assert float(topk_distillation_loss(student, ids, logp, labels, temperature)) == pytest.approx(
            float(full), rel=1e-5
        )
        logp, ids = torch.log_softmax(teacher / temperature, -1).topk(3, -1)
        coarse = float(topk_distillation_loss(student, ids, logp, labels, temperature))
        assert 0 < coarse < float(full), "k + 1 bins: a lower bound on the full KL"
    same_logp, same_ids = torch.log_softmax(student, -1).topk(3, -1)
    assert float(topk_distillation_loss(student, same_ids, same_logp, labels)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_cache_round_trips_and_lays_out_padded_batches(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_blockcbo.healing.teacher_cache import TeacherTopK, build_teacher_topk

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sequences = [[5, 9, 14, 3, 7], [8, 2, 6], [5, 9, 14, 3, 7]]  # a duplicate is cached once
    built = build_teacher_topk(teacher, sequences, top_k=4, temperature=1.0, teacher_name="t", progress=False)
    assert len(built.spans) == 2 and built.ids.shape == (8, 4)
    built.save(tmp_path / "cache.safetensors")
    cached = TeacherTopK.load(tmp_path / "cache.safetensors")
    assert cached.matches(4, 1.0, "t") and not cached.matches(8, 1.0, "t") and not cached.matches(4, 1.0, "u")
    batch = torch.tensor([[8, 2, 6, 0, 0], [5, 9, 14, 3, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids, logp = cached.batch(batch, mask)
    with torch.no_grad():
        direct = torch.log_softmax(teacher(torch.tensor([[8, 2, 6]])).logits[0], -1).topk(4, -1)
    assert torch.equal(ids[0, :3], direct.indices)
    torch.testing.assert_close(logp[0, :3], direct.values, atol=2e-3, rtol=2e-3)  # float16 storage
    assert float(logp[0, 3:].exp().sum()) == 0.0, "padding carries no probability"
    from hf_blockcbo.errors import BlockCBOError

    with pytest.raises(BlockCBOError, match="missing from the teacher cache"):
        cached.batch(torch.tensor([[1, 2, 3]]), None)


def test_healing_from_cached_teacher_logits(student, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    import hf_blockcbo.healing.trainer as healing_module

    cache = tmp_path / "teacher.safetensors"
    args = ["--teacher", str(tiny_model_dir), "--max-steps", "40", "--teacher-top-k", "32", "--teacher-cache"]
    out = tmp_path / "healed"
    before = _kl_to_teacher(student, tiny_model_dir, tokenizer)
    assert main(["heal", "--student", str(student), "--output", str(out), *args, str(cache), *HEAL]) == 0
    after = _kl_to_teacher(out, tiny_model_dir, tokenizer)
    assert after < 0.8 * before, (before, after)
    assert cache.is_file(), "an explicit cache file is kept"
    assert json.loads((out / "block_removal.json").read_text())["healing"]["teacher_top_k"] == 32

    def no_teacher(*a, **k):
        raise AssertionError("a matching cache must spare loading the teacher")

    monkeypatch.setattr(healing_module, "load_teacher", no_teacher)
    again = tmp_path / "again"
    assert main(["heal", "--student", str(student), "--output", str(again), *args, str(cache), *HEAL]) == 0
    wrong_k = [a if a != "32" else "16" for a in args]
    assert main(["heal", "--student", str(student), "--output", str(tmp_path / "x"), *wrong_k, str(cache), *HEAL]) == 2


@pytest.mark.parametrize(
    "extra,fragment",
    [(["--max-steps", "0"], "max_steps must be positive"), (["--max-steps", "-2"], "max_steps must be positive")],
)
def test_bad_step_counts_are_refused(student, tiny_model_dir, tmp_path, capsys, extra, fragment):
    out = tmp_path / "healed"
    argv = ["heal", "--student", str(student), "--teacher", str(tiny_model_dir), "--output", str(out), *extra]
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "healed.checkpoints").exists()


def test_empty_healing_data_is_refused_before_training(student, tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "healed"
    argv = ["heal", "--student", str(student), "--teacher", str(tiny_model_dir), "--data", str(empty)]
    assert main([*argv, "--max-steps", "2", "--output", str(out)]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "healed.checkpoints").exists()


@pytest.mark.parametrize("flag,applied", [([], True), (["--no-keep-freed-memory"], False)])
def test_heal_keeps_freed_memory_on_cpu_unless_told_not_to(
    student, tiny_model_dir, tmp_path, monkeypatch, capsys, flag, applied
):
    import hf_blockcbo.healing.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")  # refused after the allocator setting, before any training
    argv = ["heal", "--student", str(student), "--teacher", str(tiny_model_dir), "--data", str(empty), *flag]
    assert main([*argv, "--max-steps", "2", "--output", str(tmp_path / "healed")]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert bool(calls) is applied


_MAPPED_DURING_A_LARGE_BLOCK = """
import ctypes
from hf_blockcbo.healing.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_while_holding(size):
    block = bytearray(size)  # one malloc of `size` bytes
    return libc.mallinfo2().hblkhd

before = mapped_while_holding(256 << 20)
applied = keep_freed_memory()
print(applied, before, mapped_while_holding(256 << 20), keep_freed_memory())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    # a fresh interpreter: the setting is process-wide and would stay with the test process
    done = subprocess.run([sys.executable, "-c", _MAPPED_DURING_A_LARGE_BLOCK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    applied, before, after, again = done.stdout.split()
    assert applied == "True" and again == "True"
    assert int(before) >= 256 << 20  # glibc's default: a block this large is its own mmap
    assert int(after) < 256 << 20  # now it comes from the heap, which keeps it when freed


def test_keep_freed_memory_does_nothing_off_glibc(monkeypatch):
    from hf_blockcbo.healing import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setitem(allocator._state, "applied", False)
    assert allocator.keep_freed_memory() is False


def test_a_student_repaired_with_a_worse_start_for_training_gets_one_warning(caplog):
    """Gemma's renormalised map distils worse than its diagonal one: healing such a student says so, once."""
    from hf_blockcbo.healing.trainer import _warn_about_the_start

    from .conftest import make_model, tiny_gemma3_config, tiny_llama_config

    gemma, llama = make_model(tiny_gemma3_config()), make_model(tiny_llama_config())
    cases = [
        (gemma, {"repair": {"kind": "renormalised"}}, 1),
        (gemma, {"repair": {"kind": "diagonal"}}, 0),
        (gemma, {"repair": None}, 0),
        (gemma, {}, 0),
        (llama, {"repair": {"kind": "linear"}}, 0),
    ]
    for model, provenance, warnings in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_blockcbo.healing.trainer"):
            _warn_about_the_start(provenance, model)
        assert len(caplog.records) == warnings, (provenance, caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_blockcbo.healing.trainer"):
        _warn_about_the_start({"repair": {"kind": "renormalised"}}, gemma)
    assert "repaired with renormalised maps" in caplog.text and "--repair-kind diagonal" in caplog.text
