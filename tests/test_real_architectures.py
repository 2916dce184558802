"""Real trained models beyond SmolLM2: Gemma-3-270M (sliding + full attention, post-norms) and an upcycled MoE."""

import math

import pytest
import torch

from hf_blockcbo.data import build_calibration_set, embedded_documents
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.hessian.gradients import compute_gate_gradients
from hf_blockcbo.solvers import solve
from hf_blockcbo.surgery.architectures import describe_blocks
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import remove_blocks, save_pruned

from .conftest import run_plain_transformers
from .real_models import gemma3_gguf_path, upcycle_to_mixtral


pytestmark = pytest.mark.slow

CHECK = """
import json, math, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}).eval()
ids = torch.tensor({ids!r})
with torch.no_grad():
    out = model(input_ids=ids, labels=ids)
gen = model.generate(ids[:, :12], max_new_tokens=6, do_sample=False, use_cache=True)
print(json.dumps({{"logits": out.logits[0, -4:].flatten().tolist(), "ppl": math.exp(out.loss.item()),
                   "layers": model.config.num_hidden_layers, "layer_types": getattr(model.config, "layer_types", None),
                   "generated": gen[0, 12:].tolist()}}))
"""


def _prune_with_cbo(model, tokenizer, num_remove, tmp_path):
    blocks = describe_blocks(model)
    calibration = build_calibration_set(tokenizer, None, num_samples=8, seq_len=48)
    A, _ = compute_gate_gradients(model, calibration, batch_size=4, progress=False)
    artifact = HessianArtifact(A=A, block_names=[b.name for b in blocks], block_kinds=[b.kind for b in blocks])
    chosen = solve(artifact.H, num_remove, top_k=5).candidates[0].blocks
    ids = tokenizer(" ".join(embedded_documents("validation")[:20]), return_tensors="pt").input_ids[:, :96]
    with BlockGates(model) as gates:
        gates.set_removed(chosen)
        with torch.no_grad():
            gated = model(input_ids=ids).logits[0, -4:]
        generated = model.generate(ids[:, :12], max_new_tokens=6, do_sample=False, use_cache=True)[0, 12:].tolist()
    kept_types = [t for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if i not in chosen]
    remove_blocks(model, chosen)
    out = save_pruned(model, tokenizer, tmp_path / "pruned", {"removed_blocks": list(chosen)})
    result = run_plain_transformers(CHECK.format(path=str(out), ids=ids.tolist()))
    return artifact, chosen, gated, generated, kept_types, result


def test_gemma3_270m_prunes_reloads_and_matches_the_gated_model(tmp_path):
    from hf_blockcbo.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(gemma3_gguf_path())))
    assert model.config.num_hidden_layers == 18
    artifact, chosen, gated, generated, kept_types, result = _prune_with_cbo(model, tokenizer, 3, tmp_path)
    assert result["layers"] == 15 and result["layer_types"] == kept_types
    torch.testing.assert_close(torch.tensor(result["logits"]).view_as(gated), gated, rtol=1e-3, atol=1e-3)
    assert result["generated"] == generated
    assert math.isfinite(result["ppl"])


def test_upcycled_smollm2_moe_prunes_on_trained_weights(tmp_path):
    from hf_blockcbo.models import load_model, resolve_model

    llama, tokenizer = load_model(resolve_model(None))
    moe = upcycle_to_mixtral(llama)
    del llama
    assert {b.kind for b in describe_blocks(moe)} == {"moe"}
    artifact, chosen, gated, generated, _, result = _prune_with_cbo(moe, tokenizer, 4, tmp_path)
    assert artifact.block_kinds == ["moe"] * 30
    assert result["layers"] == 26
    torch.testing.assert_close(torch.tensor(result["logits"]).view_as(gated), gated, rtol=1e-3, atol=1e-3)
    assert result["generated"] == generated
    assert math.isfinite(result["ppl"]) and result["ppl"] < 1e4
