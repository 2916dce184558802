"""The model families hf_blockcbo knows by name. Add a family by registering one more :class:`ArchitectureSpec`."""

from __future__ import annotations

from .registry import ArchitectureSpec, register_architecture


# Pre-norm decoders: `h = h + attn(norm(h)); h = h + mlp(norm(h))` — gate the attention and MLP outputs.
register_architecture(
    ArchitectureSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "granite"),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
    )
)

# Post-norm branches: `h = h + post_norm(attn(...))`; a scale applied before the post-norm would be normalised away.
register_architecture(
    ArchitectureSpec(
        name="gemma",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        layers_path="model.layers",
        branches=("post_attention_layernorm", "post_feedforward_layernorm"),
        notes="branches end in post-norms; gates scale the post-norm outputs",
    )
)
