"""One path through the house: the same config through the CLI, the Python API, the Trainer callback and the Space
gives the same candidates and the same provenance."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from hf_blockcbo.commands.cli import main
from hf_blockcbo.config import BlockRemovalConfig


SPACE_APP = Path(__file__).resolve().parents[1] / "spaces" / "blockcbo-demo" / "app.py"


def _space(monkeypatch, model_dir):
    monkeypatch.setenv("BLOCKCBO_DEMO_MODEL", str(model_dir))
    monkeypatch.setenv("BLOCKCBO_DEMO_HESSIAN", "/nonexistent/h.safetensors")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    spec = importlib.util.spec_from_file_location("blockcbo_space_app_faces", SPACE_APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def _comparable(record: dict) -> dict:
    """Provenance without what legitimately differs between faces: wall times and the face's wording."""
    out = json.loads(json.dumps(record))
    out.pop("selection", None)
    out.get("calibration", {}).pop("seconds", None)
    (out.get("solver") or {}).pop("seconds", None)
    for record in (out.get("solver") or {}).get("rounds") or []:  # the rounds' trigger check and rounds, timed
        record.pop("seconds", None)
    (out.get("repair") or {}).pop("seconds", None)
    ((out.get("repair") or {}).get("validation") or {}).pop("seconds", None)  # the repair's check, timed
    return out


@pytest.mark.parametrize("repair", [False, True])
def test_one_config_through_every_face(tiny_model_dir, tmp_path, monkeypatch, repair):
    import torch
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    from hf_blockcbo.api import BlockRemover
    from hf_blockcbo.callback import BlockRemovalCallback
    from hf_blockcbo.data import calibration_samples

    app = _space(monkeypatch, tiny_model_dir)
    model_id = str(tiny_model_dir)
    # the Space's settings (its sliders: 8 samples, 2 blocks, 4 states, rank 0) are the shared config
    config = app.DEMO_CONFIG.replace(model=model_id, num_samples=8, num_remove=2, top_k=4, rank=0, repair=repair)

    # Space: Compute Hessian on the embedded sample, then download the rank-0 candidate
    app.compute_hessian(model_id, "embedded sample", "", None, 8, progress=lambda *a, **k: None)
    space = json.loads(
        (Path(app.download(model_id, 2, 4, 0, repair)).with_suffix("") / "block_removal.json").read_text()
    )

    # CLI
    cli_out = tmp_path / "cli"
    flags = ["--seq-len", "64", "--batch-size", "4", "--num-samples", "8", "--remove", "2", "--top-k", "4"]
    # the Space fits on 32 samples; a flag without --repair is refused, so the setting travels in a config file
    (tmp_path / "space.json").write_text(json.dumps({"repair_samples": 32}))
    flags += ["--rank", "0", "--config", str(tmp_path / "space.json"), "--no-progress"]
    flags += ["--repair" if repair else "--no-repair"]
    assert main(["prune", "--model", model_id, *flags, "--output", str(cli_out)]) == 0
    cli = json.loads((cli_out / "block_removal.json").read_text())

    # Python API
    remover = BlockRemover.from_pretrained(model_id, config)
    remover.prune(progress=False)
    api = json.loads((remover.save_pretrained(tmp_path / "api") / "block_removal.json").read_text())

    # Trainer callback, fed the same samples through a dataloader
    samples = calibration_samples(remover.tokenizer, config)
    rows = [
        {"input_ids": i, "attention_mask": m} for i, m in zip(samples.input_ids, samples.attention_mask, strict=True)
    ]
    loader = DataLoader(rows, batch_size=4)
    callback = BlockRemovalCallback(config)
    model = BlockRemover.from_pretrained(model_id, config).model
    callback.compute(TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none"), model, loader)
    from_callback = json.loads((tmp_path / "trainer" / "candidates.json").read_text())["candidates"]

    assert _comparable(cli) == _comparable(api) == _comparable(space)
    assert cli["config"]["repair"] is repair and (cli["repair"] is not None) is repair
    spectrum = [(c["blocks"], pytest.approx(c["energy"], rel=1e-5)) for c in cli["spectrum"]]
    assert [(c["blocks"], c["energy"]) for c in from_callback] == spectrum
    assert torch.equal(callback.calibration.input_ids, samples.input_ids)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num_samples": True}, "`num_samples` must be int"),
        ({"beta": "0.1"}, "`beta` must be float"),
        ({"protected": [1.5]}, "`protected` must be list[int]"),
        ({"time_limit": "10"}, "`time_limit` must be float or null"),
        ({"repair": "yes"}, "`repair` must be bool"),
    ],
)
def test_a_config_file_with_a_wrong_type_is_one_clear_error(values, message, tmp_path):
    from hf_blockcbo.errors import BlockCBOError

    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(BlockCBOError, match=re.escape(message)):
        BlockRemovalConfig.from_file(path)


def test_artifacts_and_candidates_from_another_model_are_refused(tiny_model_dir, tmp_path, capsys):
    """Same architecture, same block names, other weights: the fingerprint tells them apart."""
    from .conftest import make_model, make_tokenizer, tiny_llama_config

    tokenizer = make_tokenizer()
    other = tmp_path / "other"
    make_model(tiny_llama_config(vocab_size=len(tokenizer)), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    hessian, candidates = tmp_path / "h.safetensors", tmp_path / "c.json"
    common = ["--num-samples", "4", "--seq-len", "24", "--measured-samples", "2", "--no-progress"]
    assert main(["calibrate", "--model", str(other), *common, "--output", str(hessian)]) == 0
    assert main(["solve", "--hessian", str(hessian), "--remove", "2", "--output", str(candidates)]) == 0
    capsys.readouterr()
    for flags in (["--hessian", str(hessian), "--remove", "2"], ["--candidates", str(candidates), "--rank", "0"]):
        out = tmp_path / f"out{len(flags)}"
        assert main(["prune", "--model", str(tiny_model_dir), *flags, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "weights differ" in err and "Traceback" not in err and not out.exists()


def test_a_failed_save_leaves_the_api_object_as_it_was(tiny_model_dir, tmp_path):
    from hf_blockcbo.api import BlockRemover
    from hf_blockcbo.errors import BlockCBOError

    remover = BlockRemover.from_pretrained(str(tiny_model_dir), BlockRemovalConfig(blocks=[1, 2], repair=True))
    remover.prune(progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    weights = {k: v.clone() for k, v in remover.model.state_dict().items()}
    with pytest.raises(BlockCBOError, match="overwrite"):
        remover.save_pretrained(taken)
    assert remover.model.config.num_hidden_layers == 6 and (taken / "keep.txt").read_text() == "mine"
    assert all((weights[k] == v).all() for k, v in remover.model.state_dict().items()), "no repair folded, no cut"
    saved = remover.save_pretrained(tmp_path / "fresh")
    assert json.loads((saved / "block_removal.json").read_text())["num_blocks_after"] == 4
