"""One table over every supported family: gates, removal, plain-transformers reload, generation, config round-trip."""

import pytest
import torch

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.surgery.architectures import describe_blocks, get_architecture, get_layers
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import remove_blocks, save_pruned

from .conftest import make_model, run_plain_transformers, tiny_gemma3_config, tiny_llama_config


SMALL = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, max_position_embeddings=128)
LLAMA_LIKE = dict(SMALL, intermediate_size=64, num_hidden_layers=6, num_key_value_heads=2, pad_token_id=0)


def _config(name):
    import transformers as t

    if name == "llama":
        return tiny_llama_config()
    if name == "mistral":
        return t.MistralConfig(**LLAMA_LIKE, sliding_window=None)
    if name == "qwen2":
        return t.Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=3)
    if name == "qwen3":
        return t.Qwen3Config(**LLAMA_LIKE, head_dim=8)
    if name == "phi3":
        return t.Phi3Config(**LLAMA_LIKE)
    if name == "gemma2":
        return t.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=4)
    if name == "gemma3":
        return tiny_gemma3_config()
    if name == "mixtral":
        return t.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **LLAMA_LIKE,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[0, 4],
        )
    if name == "deepseek_v3":
        return t.DeepseekV3Config(
            **LLAMA_LIKE,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=2,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
        )
    if name == "gpt2":
        return t.GPT2Config(vocab_size=256, n_embd=32, n_layer=6, n_head=4, n_positions=128)
    if name == "gpt_neox":
        return t.GPTNeoXConfig(**SMALL, intermediate_size=64, num_hidden_layers=6, use_parallel_residual=True)
    if name == "opt":
        return t.OPTConfig(
            vocab_size=256,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
    if name == "falcon":
        return t.FalconConfig(vocab_size=256, hidden_size=32, num_hidden_layers=6, num_attention_heads=4)
    if name == "nemotron_h":
        return t.NemotronHConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            layers_block_type=["mamba", "attention", "mamba", "moe", "mamba", "attention"],
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=8,
            mamba_n_groups=1,
            n_groups=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            n_group=1,
            topk_group=1,
            max_position_embeddings=128,
            use_mamba_kernels=False,
        )
    raise KeyError(name)


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
    "nemotron_h",
]
REMOVED = [1, 3]
PROMPT = [[5, 17, 33, 2, 9, 41, 100, 7, 12, 90]]

RELOAD = """
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}).eval()
ids = torch.tensor({prompt!r})
with torch.no_grad():
    logits = model(input_ids=ids).logits
out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
cfg = model.config
layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == cfg.num_hidden_layers][0]
print(json.dumps({{"logits": logits.flatten().tolist(), "tokens": out[0].tolist(), "layers": cfg.num_hidden_layers,
                   "layer_types": getattr(cfg, "layer_types", None),
                   "mlp_classes": [type(getattr(b, "mlp", getattr(b, "mixer", b))).__name__ for b in layers]}}))
"""


def _mlp_classes(layers):
    return [type(getattr(b, "mlp", getattr(b, "mixer", b))).__name__ for b in layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family, tmp_path):
    model = make_model(_config(family))
    spec = get_architecture(model)
    assert spec.name != "generic", f"{family} must have a registered spec"
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    kept = [i for i in range(6) if i not in REMOVED]
    kept_types = [t for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if i in kept]
    kept_classes = [c for i, c in enumerate(_mlp_classes(get_layers(model))) if i in kept]

    with BlockGates(model) as gates:
        assert gates.gate == "branch"
        gates.set(torch.ones(6))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reference), "α = 1 must be bit-exact"
        gates.set_removed(REMOVED)
        with torch.no_grad():
            gated = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)[0].tolist()
    assert not torch.allclose(gated, reference, atol=1e-4), "the removed blocks must matter"

    remove_blocks(model, REMOVED)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, gated, rtol=1e-4, atol=1e-4)
    out = save_pruned(model, None, tmp_path / family, {"removed_blocks": REMOVED})

    result = run_plain_transformers(RELOAD.format(path=str(out), prompt=PROMPT))
    assert result["layers"] == 4
    torch.testing.assert_close(torch.tensor(result["logits"]).view_as(gated), gated, rtol=1e-4, atol=1e-4)
    assert result["tokens"] == tokens
    assert result["mlp_classes"] == kept_classes, "MoE / dense / mixer placement preserved for every kept layer"
    if kept_types:
        assert result["layer_types"] == kept_types


def test_hybrid_block_kinds_feed_the_solver():
    model = make_model(_config("nemotron_h"))
    kinds = [b.kind for b in describe_blocks(model)]
    assert kinds == ["mamba", "attention", "mamba", "moe", "mamba", "attention"]
    moe = make_model(_config("qwen2_moe"))
    assert [b.kind for b in describe_blocks(moe)] == ["dense", "moe", "dense", "dense", "dense", "moe"]


def test_refusals_leave_the_model_untouched():
    import transformers as t

    gpt2 = make_model(
        t.GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, scale_attn_by_inverse_layer_idx=True)
    )
    with pytest.raises(BlockCBOError, match="1/\\(layer_idx\\+1\\)"):
        remove_blocks(gpt2, [1])
    assert gpt2.config.num_hidden_layers == 4 and len(gpt2.transformer.h) == 4
    opt = make_model(
        t.OPTConfig(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            do_layer_norm_before=False,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(BlockCBOError, match="post-LN"):
        remove_blocks(opt, [0])


def test_unknown_architecture_uses_the_generic_layer_gate(tiny_llama):
    tiny_llama.config.model_type = "my_new_llm"
    spec = get_architecture(tiny_llama)
    assert spec.name == "generic"
    with BlockGates(tiny_llama) as gates:
        assert gates.gate == "layer"


def test_readme_support_table_is_generated_from_the_registry():
    from pathlib import Path

    from hf_blockcbo.surgery.architectures import support_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- support-table:start -->\n", "\n<!-- support-table:end -->"
    assert start in readme and end in readme, "README needs the support-table markers"
    current = readme.split(start)[1].split(end)[0]
    expected = support_table(tested=FAMILIES)
    assert current == expected, "README table is stale; regenerate it with support_table(tested=FAMILIES)"


def test_every_registered_repair_form_is_one_fit_repair_knows():
    from hf_blockcbo.config import REPAIR_KINDS
    from hf_blockcbo.surgery.architectures.registry import registered_architectures

    for spec in registered_architectures():
        assert spec.repair in (*REPAIR_KINDS, "none"), (spec.name, spec.repair)
        assert spec.repair_before_training in (None, *REPAIR_KINDS), (spec.name, spec.repair_before_training)
        if spec.repair_before_training is not None:  # a start for training is only named where the family repairs
            assert spec.repair != "none", spec.name
