import json

import pytest
import torch

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import PROVENANCE_FILE, remove_blocks, save_pruned

from .conftest import run_plain_transformers


PROMPT = [[5, 17, 33, 2, 9, 41, 100, 7]]

RELOAD = """
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}).eval()
ids = torch.tensor({prompt!r})
with torch.no_grad():
    logits = model(input_ids=ids).logits
out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
print(json.dumps({{"logits": logits.flatten().tolist(), "tokens": out[0].tolist(), "dtype": str(model.dtype),
                   "layers": model.config.num_hidden_layers, "layer_types": getattr(model.config, "layer_types", None)}}))
"""


def _gated_reference(model, removed):
    ids = torch.tensor(PROMPT)
    with BlockGates(model) as gates:
        gates.set_removed(removed)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    return logits, tokens[0].tolist()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_saved_folder_reloads_in_plain_transformers(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    removed = [1, 3]
    original_types = list(getattr(model.config, "layer_types", None) or [])
    logits, tokens = _gated_reference(model, removed)
    remove_blocks(model, removed)
    out = save_pruned(model, None, tmp_path / "pruned", {"removed_blocks": removed})
    result = run_plain_transformers(RELOAD.format(path=str(out), prompt=PROMPT))
    assert result["layers"] == 4
    assert result["dtype"] == "torch.float32"
    torch.testing.assert_close(torch.tensor(result["logits"]).view_as(logits), logits, rtol=1e-5, atol=1e-5)
    assert result["tokens"] == tokens
    if original_types:
        assert result["layer_types"] == [t for i, t in enumerate(original_types) if i not in removed]
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["removed_blocks"] == removed and provenance["num_parameters_after"] > 0


def test_layer_indices_are_renumbered(tiny_llama):
    remove_blocks(tiny_llama, [0, 2])
    assert [layer.self_attn.layer_idx for layer in tiny_llama.model.layers] == [0, 1, 2, 3]
    assert tiny_llama.config.num_hidden_layers == 4


def test_unknown_per_layer_config_field_is_refused(tiny_llama):
    tiny_llama.config.per_layer_scale = [1.0] * 6
    with pytest.raises(BlockCBOError, match="per_layer_scale"):
        remove_blocks(tiny_llama, [1])
    assert len(tiny_llama.model.layers) == 6, "nothing is removed when the config cannot be rewritten"


@pytest.mark.parametrize("blocks,match", [([], "no block"), ([6], "out of range"), (list(range(6)), "all 6")])
def test_bad_block_lists_are_refused(tiny_llama, blocks, match):
    with pytest.raises(BlockCBOError, match=match):
        remove_blocks(tiny_llama, blocks)


def test_output_folder_is_protected(tiny_llama, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(BlockCBOError, match="--overwrite"):
        save_pruned(tiny_llama, None, target, {})
    assert (target / "keep.txt").read_text() == "precious"
    save_pruned(tiny_llama, None, target, {}, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder left behind"
