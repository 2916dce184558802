"""Publishing against a real HTTP server on loopback: the real huggingface_hub client and transformers' push_to_hub."""

import json

import pytest
import yaml

from hf_blockcbo.commands.cli import main

from .conftest import run_plain_transformers
from .hub_server import HubServer


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        import huggingface_hub.hf_api as hf_api
        import transformers.utils.hub as transformers_hub

        # shared `HfApi` instances read the endpoint when they are made, which in some test orders is before this
        # fixture: huggingface_hub's module-level one (behind its top-level `create_repo`) and the one transformers'
        # own push_to_hub makes on first use and keeps
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield server


COMMON = ["--num-samples", "6", "--seq-len", "24", "--batch-size", "4", "--no-progress", "--top-k", "4"]


@pytest.fixture
def pruned(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    art = tmp_path / "h.safetensors"
    args = ["prune", "--model", str(tiny_model_dir), "--remove", "2", *COMMON, "--save-hessian", str(art)]
    assert main([*args, "--output", str(out)]) == 0
    return out, art


def test_push_then_download_and_load_with_plain_transformers(hub, pruned, tmp_path):
    out, art = pruned
    assert (
        main(["push", "--model", str(out), "--repo", "tester/tiny-pruned", "--hessian", str(art), "--license", "mit"])
        == 0
    )
    files = hub.repos["tester/tiny-pruned"].branches["main"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "block_removal.json", "README.md"} <= set(files)
    assert "hessian.safetensors" in files
    assert len(hub.repos["tester/tiny-pruned"].commits["main"]) == 2, "one commit for everything"
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) >= {"pruned", "depth-pruning", "hf-blockcbo"} and meta["license"] == "mit"
    assert "base_model_relation" not in meta, "not healed: no relation"
    index = meta["model-index"][0]["results"][0]
    assert index["metrics"][0]["type"] == "perplexity" and index["metrics"][0]["value"] > 0
    provenance = json.loads(files["block_removal.json"])
    assert ", ".join(map(str, provenance["removed_blocks"])) in card and '"num_remove": 2' in card

    script = (
        "import json, os; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('tester/tiny-pruned')\n"
        "print(json.dumps({'layers': m.config.num_hidden_layers}))"
    )
    import os

    env_keys = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET")
    saved = {k: os.environ[k] for k in env_keys}
    os.environ["HF_HUB_OFFLINE"] = "0"
    try:
        assert run_plain_transformers(script, env={**saved, "HF_HUB_OFFLINE": "0"}) == {"layers": 4}
    finally:
        pass


def test_card_yaml_passes_the_hub_validator(hub, pruned):
    from hf_blockcbo.hub.publish import model_card

    out, _ = pruned
    card = model_card(out, "tester/x")
    card.validate()
    assert hub.validated_yaml and hub.validated_yaml[-1]["library_name"] == "transformers"


@pytest.mark.parametrize("resolved", [True, False])
def test_card_says_whether_the_ground_state_leads_its_runner_up(pruned, resolved):
    from hf_blockcbo.hub.publish import model_card

    out, _ = pruned
    record = out / "block_removal.json"
    provenance = json.loads(record.read_text())
    se = 0.002
    lead = {"runner_up": [0, 3], "lead": 0.01 if resolved else 0.003, "standard_error": se, "resolved": resolved}
    provenance["solver"] = {**(provenance.get("solver") or {}), "ground_lead": lead}
    record.write_text(json.dumps(provenance))
    card = str(model_card(out, "tester/x"))
    line = next(x for x in card.splitlines() if "leads the second-lowest" in x)
    assert "(blocks 0, 3)" in line and f"{lead['lead']:.4g} ± {se:.2g}" in line
    assert ("tells the two apart" in line) == resolved and ("a tie at this calibration size" in line) != resolved


def test_card_without_a_lead_says_nothing_of_one(pruned):
    from hf_blockcbo.hub.publish import model_card

    out, _ = pruned
    record = out / "block_removal.json"
    provenance = json.loads(record.read_text())
    (provenance.get("solver") or {}).pop("ground_lead", None)
    record.write_text(json.dumps(provenance))
    assert "leads the second-lowest" not in str(model_card(out, "tester/x"))


def test_failed_upload_leaves_nothing_half_published(hub, pruned, capsys):
    out, _ = pruned
    hub.fail_next_commit = True
    with pytest.raises(Exception, match="500|storage failure"):
        main(["push", "--model", str(out), "--repo", "tester/broken"])
    assert "tester/broken" not in hub.repos, "a repository created by a failed push is removed"
    # an existing repository keeps its previous state
    assert main(["push", "--model", str(out), "--repo", "tester/kept"]) == 0
    before = dict(hub.repos["tester/kept"].branches["main"])
    hub.fail_next_commit = True
    with pytest.raises(Exception, match="500|storage failure"):
        main(["push", "--model", str(out), "--repo", "tester/kept"])
    assert hub.repos["tester/kept"].branches["main"] == before


def test_hessian_and_config_round_trip_through_the_hub(hub, pruned, tiny_model_dir, tmp_path):
    from hf_blockcbo.config import BlockRemovalConfig
    from hf_blockcbo.hessian.artifact import HessianArtifact
    from hf_blockcbo.hub.publish import load_hessian, push_hessian

    _, art = pruned
    config = BlockRemovalConfig(num_remove=3, top_k=7)
    push_hessian(art, "tester/tiny-hessian", config=config)
    loaded = load_hessian("tester/tiny-hessian")
    assert loaded.block_names == HessianArtifact.load(art).block_names
    assert BlockRemovalConfig.from_pretrained("tester/tiny-hessian").top_k == 7
    config.push_to_hub("tester/config-only")
    assert BlockRemovalConfig.from_pretrained("tester/config-only").num_remove == 3
    out = tmp_path / "again"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_model_dir),
                "--remove",
                "3",
                "--hessian",
                str(art),
                "--select",
                "energy",
                "--output",
                str(out),
            ]
        )
        == 0
    )


def test_block_remover_api_and_transformers_push_to_hub(hub, tiny_model_dir, tmp_path):
    from hf_blockcbo import BlockRemovalConfig, BlockRemover

    config = BlockRemovalConfig(num_remove=2, num_samples=6, seq_len=24, batch_size=3, top_k=3, select="energy")
    remover = BlockRemover.from_pretrained(str(tiny_model_dir), config)
    remover.calibrate(progress=False)
    assert len(remover.solve().candidates) == 3
    remover.prune(progress=False)
    remover.save_pretrained(tmp_path / "api")
    assert BlockRemovalConfig.from_pretrained(tmp_path / "api").num_remove == 2
    remover.push_to_hub("tester/api-pruned")
    files = hub.repos["tester/api-pruned"].branches["main"]
    assert "hessian.safetensors" in files and not any(name.startswith(".") for name in files)
    # transformers' own push_to_hub works on the pruned model too
    remover.model.push_to_hub("tester/api-pruned-transformers")
    assert "config.json" in hub.repos["tester/api-pruned-transformers"].branches["main"]


def test_the_spaces_push_publishes_what_prune_publishes(hub, pruned, tiny_model_dir, monkeypatch):
    """The Space's download/push path builds the same provenance as `prune` (it once lacked the card's keys)."""
    import importlib.util
    from pathlib import Path

    out, art = pruned
    monkeypatch.setenv("BLOCKCBO_DEMO_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("BLOCKCBO_DEMO_HESSIAN", str(art))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    path = Path(__file__).resolve().parents[1] / "spaces" / "blockcbo-demo" / "app.py"
    spec = importlib.util.spec_from_file_location("blockcbo_space_app", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    url = app.push(str(tiny_model_dir), 2, 4, 1, "tester/from-space", "hf_test_token")
    assert url
    files = hub.repos["tester/from-space"].branches["main"]
    assert {"config.json", "model.safetensors", "block_removal.json", "README.md"} <= set(files)
    from_space = json.loads(files["block_removal.json"])
    from_prune = json.loads((out / "block_removal.json").read_text())
    assert set(from_prune) <= set(from_space), sorted(set(from_prune) - set(from_space))
    assert from_space["num_blocks_before"] == 6 and from_space["num_blocks_after"] == 4
    assert from_space["rank"] == 1 and from_space["config"]["curvature"] == from_prune["config"]["curvature"]
    assert "tester/from-space" in files["README.md"].decode() or "removed" in files["README.md"].decode()
