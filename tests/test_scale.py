"""Hessian at scale: 2 processes == 1 process, kill-and-resume == uninterrupted, device map, checkpointing, callback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.artifact import HessianArtifact

from .conftest import free_port


ARGS = ["--curvature", "empirical", "--num-samples", "7", "--seq-len", "20", "--batch-size", "2", "--no-progress"]


KILL_AFTER = str(Path(__file__).with_name("kill_after.py"))


def _cli(*args, env=None, launcher=(), kill_after_rows=None):
    cmd = [*launcher, "-m", "hf_blockcbo.cli", *args] if launcher else [sys.executable, "-m", "hf_blockcbo.cli", *args]
    if kill_after_rows is not None:  # killed right after that many checkpoints (tests/kill_after.py)
        cmd = [sys.executable, KILL_AFTER, "rows", str(kill_after_rows), "-m", "hf_blockcbo.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "h.safetensors"
    run = _cli("calibrate", "--model", str(tiny_model_dir), *ARGS, "--output", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    return HessianArtifact.load(out)


def _launcher(*flags):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *flags,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


@pytest.mark.multiprocess
def test_two_processes_equal_one(tiny_model_dir, tmp_path, single):
    out = tmp_path / "h2.safetensors"
    run = _cli(
        "calibrate", "--model", str(tiny_model_dir), *ARGS, "--output", str(out), launcher=_launcher("--multi_gpu")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout
    two = HessianArtifact.load(out)
    assert two.A.shape == single.A.shape == (7, 6)  # 7 samples over 2 processes: uneven shards, no duplicates
    torch.testing.assert_close(two.A, single.A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.losses, single.losses, rtol=1e-5, atol=1e-6)
    assert two.metadata["num_processes"] == "2"


@pytest.mark.multiprocess
def test_fsdp_sharded_weights_give_the_single_process_rows(tiny_model_dir, tmp_path, single):
    out = tmp_path / "fsdp.safetensors"
    # batch 3 over shards of 4 and 3 samples: 2 batches against 1, so the short shard runs a padding batch
    args = [a if a != "2" else "3" for a in ARGS]
    # `accelerate launch --use_fsdp` (the documented route) turns the sharding on, as `--fsdp` does
    run = _cli(
        "calibrate", "--model", str(tiny_model_dir), *args, "--output", str(out), launcher=_launcher("--use_fsdp")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fsdp = HessianArtifact.load(out)
    assert fsdp.A.shape == (7, 6) and fsdp.metadata["weights_sharded"] == "fsdp"
    torch.testing.assert_close(fsdp.A, single.A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fsdp.losses, single.losses, rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_the_identical_artifact(tiny_model_dir, tmp_path, single):
    out = tmp_path / "h.safetensors"
    args = ["calibrate", "--model", str(tiny_model_dir), *ARGS, "--checkpoint-every", "1", "--output", str(out)]
    killed = _cli(*args, kill_after_rows=2)
    assert killed.returncode == 137
    partial = tmp_path / "h.safetensors.partial"
    assert partial.is_file() and not out.exists(), "killed: rows checkpointed, no artifact"
    assert HessianArtifact is not None and torch.load is not None
    from safetensors.torch import load_file

    assert load_file(str(partial))["A"].shape == (4, 6), "two batches of two samples were done"
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the Hessian pass: 4 of 7" in resumed.stderr
    assert torch.equal(HessianArtifact.load(out).A, single.A)
    assert not partial.exists(), "the resume file is removed once the artifact is written"


def test_resume_file_from_another_configuration_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "h.safetensors"
    args = ["calibrate", "--model", str(tiny_model_dir), *ARGS, "--checkpoint-every", "1", "--output", str(out)]
    assert _cli(*args, kill_after_rows=1).returncode == 137
    other = _cli(*[a if a != "20" else "16" for a in args])  # another --seq-len
    assert other.returncode == 2 and "another configuration" in other.stderr


def test_device_map_and_gradient_checkpointing_give_the_same_rows(tiny_model_dir, tmp_path, single):
    out = tmp_path / "dm.safetensors"
    args = ["calibrate", "--model", str(tiny_model_dir), *ARGS, "--device-map", "auto", "--gradient-checkpointing"]
    run = _cli(*args, "--output", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(HessianArtifact.load(out).A, single.A, rtol=1e-5, atol=1e-6)


def test_disk_offload_is_refused(monkeypatch, tiny_model_dir):
    import transformers

    from hf_blockcbo.models import ModelSource, load_model

    real = transformers.AutoModelForCausalLM.from_pretrained

    def offloading(*args, **kwargs):
        model = real(*args, **{k: v for k, v in kwargs.items() if k != "device_map"})
        model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.5": "disk"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offloading)
    source = ModelSource(str(tiny_model_dir), None, None, str(tiny_model_dir))
    with pytest.raises(BlockCBOError, match="offloads 1 modules to disk"):
        load_model(source, device_map="auto")


def test_bf16_model_accumulates_float32_gradients(tiny_model_dir, tmp_path, single):
    out = tmp_path / "bf16.safetensors"
    run = _cli("calibrate", "--model", str(tiny_model_dir), *ARGS, "--dtype", "bfloat16", "--output", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    art = HessianArtifact.load(out)
    assert art.A.dtype == torch.float32 and art.metadata["dtype"] == "torch.bfloat16"
    cos = torch.nn.functional.cosine_similarity(art.A.flatten(), single.A.flatten(), dim=0)
    assert cos > 0.95, "bf16 rows approximate the float32 rows"


def test_callback_writes_the_artifact_and_removes_blocks_mid_training(tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hf_blockcbo import BlockRemovalCallback, BlockRemovalConfig
    from hf_blockcbo.data import build_calibration_set

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cal = build_calibration_set(tokenizer, None, num_samples=16, seq_len=16)
    rows = [{"input_ids": ids.tolist()} for ids in cal.input_ids]
    callback = BlockRemovalCallback(
        BlockRemovalConfig(num_remove=2, top_k=3, curvature="empirical"), at="train_begin", remove_at_step=2
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        learning_rate=1e-3,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows[:8],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    art = HessianArtifact.load(tmp_path / "run" / "hessian.safetensors")
    assert art.A.shape[1] == 6 and art.A.shape[0] > 0
    assert (tmp_path / "run" / "candidates.json").is_file()
    assert callback.removed is not None and len(callback.removed) == 2
    assert trainer.model.config.num_hidden_layers == 4 and len(trainer.model.model.layers) == 4
    assert trainer.state.global_step == 4, "training went on after the removal"
    live = {id(p) for p in trainer.model.parameters()}
    assert all(id(p) in live for g in trainer.optimizer.param_groups for p in g["params"])


def _training_run(model_dir, out, processes: int, *extra):
    script = os.path.join(os.path.dirname(__file__), "multiprocess_training.py")
    launcher = [sys.executable] if processes == 1 else _launcher("--multi_gpu")
    cmd = [*launcher, script, str(model_dir), str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return HessianArtifact.load(out / "run" / "hessian.safetensors")


@pytest.mark.multiprocess
def test_callback_under_two_training_processes_equals_one(tiny_model_dir, tmp_path):
    import json

    one = _training_run(tiny_model_dir, tmp_path / "one", 1)
    two = _training_run(tiny_model_dir, tmp_path / "two", 2, "--remove-at-step", "2")
    assert one.A.shape == two.A.shape == (15, 6), "15 samples, each exactly once, over uneven shards"
    torch.testing.assert_close(two.A, one.A, rtol=1e-5, atol=1e-6)
    assert two.metadata["num_processes"] == "2"
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["removed"] == ranks[1]["removed"] and len(ranks[0]["removed"]) == 2
    assert all(r["layers"] == 4 and r["steps"] == 4 and r["world_size"] == 2 for r in ranks), ranks
