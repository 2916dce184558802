"""The model families hf_blockcbo knows by name. Add a family by registering one more :class:`ArchitectureSpec`."""

from __future__ import annotations

from torch import nn

from ...errors import BlockCBOError
from .registry import ArchitectureSpec, register_architecture


def _is_moe(module: nn.Module | None) -> bool:
    if module is None:
        return False
    name = type(module).__name__.lower()  # Qwen2MoeMLP is a dense MLP; Qwen2MoeSparseMoeBlock, DeepseekV3MoE are not
    return hasattr(module, "experts") or "sparse" in name or name.endswith("moe")


def mlp_kind(config, index: int, block: nn.Module) -> str:
    """`moe` for a block whose feed-forward is a sparse mixture of experts, `dense` otherwise."""
    return "moe" if _is_moe(getattr(block, "mlp", None)) else "dense"


_NEMOTRON_KINDS = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
}


def nemotron_kind(config, index: int, block: nn.Module) -> str:
    block_type = getattr(block, "block_type", "")
    return _NEMOTRON_KINDS.get(block_type, block_type or "unknown")


def qwen_moe_placement(config, keep: list[int]) -> None:
    """Qwen2/3-MoE place experts by `(i + 1) % decoder_sparse_step` and `mlp_only_layers`, keyed on the old index:
    replace both by an explicit list so every kept layer keeps its MLP kind."""
    only = set(config.mlp_only_layers or [])
    step = config.decoder_sparse_step or 1
    experts = getattr(config, "num_experts", 0) or 0
    sparse = [old not in only and experts > 0 and (old + 1) % step == 0 for old in keep]
    config.decoder_sparse_step = 1
    config.mlp_only_layers = [new for new, is_sparse in enumerate(sparse) if not is_sparse]


def deepseek_placement(config, keep: list[int]) -> None:
    """DeepSeek-V3 makes layers `< first_k_dense_replace` dense; the kept dense layers stay first, so count them."""
    config.first_k_dense_replace = sum(1 for old in keep if old < config.first_k_dense_replace)


def gpt2_guard(config, keep: list[int]) -> None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise BlockCBOError(
            "this GPT-2 config scales attention by 1/(layer_idx+1): renumbering the kept layers would change their "
            "computation, so its blocks cannot be removed exactly"
        )


def opt_guard(config, keep: list[int]) -> None:
    if not getattr(config, "do_layer_norm_before", True):
        raise BlockCBOError(
            "this OPT config is post-LN (do_layer_norm_before=False): the layer norm sits after the residual add, so "
            "a removed block still changes the stream; removal would not match the gated model"
        )


# Pre-norm decoders: `h = h + attn(norm(h)); h = h + mlp(norm(h))` — gate the attention and MLP outputs.
register_architecture(
    ArchitectureSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite"),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
    )
)
register_architecture(
    ArchitectureSpec(
        name="phi3",
        model_types=("phi3",),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
        notes="residual dropouts sit after the gated outputs (inactive in eval)",
    )
)

# Post-norm branches: `h = h + post_norm(attn(...))`; a scale applied before the post-norm would be normalised away.
register_architecture(
    ArchitectureSpec(
        name="gemma",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        layers_path="model.layers",
        branches=("post_attention_layernorm", "post_feedforward_layernorm"),
        repair="renormalised",  # measured better than "diagonal" and "rotation" on held-out text (docs/results.md §3)
        repair_before_training="diagonal",  # distils to better held-out text from it (docs/results.md §3)
        norm_weight_offset=1.0,
        post_norm_input="mlp",
        notes="branches end in post-norms: the gates scale the post-norm outputs; a repair map is a d×d map folded "
        "into the MLP before the post-norm plus a scale in the norm (`diagonal`, `rotation` available); "
        "sliding/full layer_types sliced",
    )
)

# Mixture-of-experts decoders.
register_architecture(
    ArchitectureSpec(
        name="mixtral",
        model_types=("mixtral",),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
        block_kind=mlp_kind,
    )
)
register_architecture(
    ArchitectureSpec(
        name="qwen-moe",
        model_types=("qwen2_moe", "qwen3_moe"),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
        block_kind=mlp_kind,
        rewrite_config=qwen_moe_placement,
        notes="decoder_sparse_step/mlp_only_layers rewritten to an explicit mlp_only_layers list",
    )
)
register_architecture(
    ArchitectureSpec(
        name="deepseek-v3",
        model_types=("deepseek_v3",),
        layers_path="model.layers",
        branches=("self_attn", "mlp"),
        block_kind=mlp_kind,
        rewrite_config=deepseek_placement,
        notes="first_k_dense_replace recounted over the kept layers",
    )
)

# GPT-style stacks.
register_architecture(
    ArchitectureSpec(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        branches=("attn", "mlp"),
        rewrite_config=gpt2_guard,
        notes="refused when scale_attn_by_inverse_layer_idx is set (the scale is keyed on the layer index)",
    )
)
register_architecture(
    ArchitectureSpec(
        name="gpt-neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        branches=("attention", "mlp"),
        notes="parallel residual: attention and MLP share the layer's gate",
    )
)
register_architecture(
    ArchitectureSpec(
        name="opt",
        model_types=("opt",),
        layers_path="model.decoder.layers",
        branches=("self_attn", "fc2"),
        rewrite_config=opt_guard,
        notes="the MLP branch ends in fc2; post-LN configs (do_layer_norm_before=False) are refused",
    )
)
register_architecture(
    ArchitectureSpec(
        name="falcon",
        model_types=("falcon",),
        layers_path="transformer.h",
        branches=("self_attention", "mlp"),
    )
)

# Hybrid Mamba / attention / MoE: every layer is one block with one mixer.
register_architecture(
    ArchitectureSpec(
        name="nemotron-h",
        model_types=("nemotron_h",),
        layers_path="model.layers",
        branches=("mixer",),
        per_layer_fields=("layer_types", "layers_block_type"),
        block_kind=nemotron_kind,
        notes="each Mamba / attention / MoE / MLP layer is its own block; layers_block_type sliced",
    )
)
