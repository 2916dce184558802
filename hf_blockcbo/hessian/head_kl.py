"""KL and cross-entropy to a reference distribution from the final hidden state, the LM head applied vocabulary chunk
by vocabulary chunk, so the ``[rows, T, V]`` logits of a measured forward are never formed.

For a linear head z = W·h + b and a reference distribution p over the vocabulary,

    KL(p ‖ softmax z) = Σ_v p_v log p_v − Σ_v p_v z_v + logsumexp(z),   Σ_v p_v z_v = h·(Wᵀp) + b·p,

so with Wᵀp and b·p computed once per reference, each gated forward needs only logsumexp(z), accumulated over
chunks of W that stay in cache (a running maximum and sum), and the target logit W_y·h + b_y. Forming the full
logits and reducing them was a large part of a measured configuration's time (SmolLM2 on a 2-core CPU: about 0.55 of
1.9 s in one profile; the head's matrix product itself remains), and more with a 262k vocabulary
(`benchmarks/measured_cost.py`: 1.08× on SmolLM2's pair phase, 1.40× on Gemma-3-270M's).

A model whose head is not a plain `nn.Linear`, or whose forward changes the logits after it (Gemma 2's final
soft-capping, Cohere's logit scale), is detected by comparing against the full forward once; the caller then measures
with full logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


_CHUNK_BYTES = 16 * 2**20  # logits of one vocabulary chunk, all rows (sized to stay in a CPU's last-level cache)
_MIN_CHUNK = 256  # vocabulary entries per chunk at least (a matrix product too thin is slow)


class _HeadInput(nn.Module):
    """Stands in for the LM head during a forward: keeps its input and returns one column (never read)."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :1]


@dataclass
class LinearHead:
    """The weight (``[V, d]``) and bias (``[V]`` or None) of a model's LM head."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, model: nn.Module) -> LinearHead | None:
        """The model's head if it is a plain `nn.Linear` (None otherwise: measure with full logits)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            return None
        return cls(head.weight, head.bias)

    @contextlib.contextmanager
    def capture(self, model: nn.Module):
        """Inside the ``with``, the model's head is a stub that keeps its input (``stub.hidden``); restored on exit."""
        original = model.get_output_embeddings()
        stub = _HeadInput()
        model.set_output_embeddings(stub)
        try:
            yield stub
        finally:
            model.set_output_embeddings(original)

    def reference_terms(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wᵀp, ``[b, T-1, d]``; b·p, ``[b, T-1]``, zeros without a bias) of reference probabilities ``[b, T-1, V]``."""
        weight = self.weight.float()
        p_weight = probs @ weight
        p_bias = probs @ self.bias.float() if self.bias is not None else torch.zeros(probs.shape[:-1])
        return p_weight, p_bias.to(p_weight.device)

    def logsumexp(self, hidden: torch.Tensor) -> torch.Tensor:
        """logsumexp over the vocabulary of W·h + b for every row of ``hidden`` (``[rows, d]``), in fp32."""
        rows, vocab = hidden.shape[0], self.weight.shape[0]
        chunk = min(vocab, max(_MIN_CHUNK, int(_CHUNK_BYTES // (4 * max(rows, 1)))))
        peak = torch.full((rows,), float("-inf"), device=hidden.device)
        total = torch.zeros(rows, device=hidden.device)
        for lo in range(0, vocab, chunk):
            z = hidden @ self.weight[lo : lo + chunk].T
            if self.bias is not None:
                z = z + self.bias[lo : lo + chunk]
            z = z.float()
            new_peak = torch.maximum(peak, z.amax(-1))
            total = total * torch.exp(peak - new_peak) + z.sub_(new_peak[:, None]).exp_().sum(-1)
            peak = new_peak
        return peak + torch.log(total)

    def target_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """W_y·h + b_y for every row of ``hidden`` (``[rows, d]``) and its target ``y`` (``[rows]``), in fp32."""
        z = (hidden.float() * self.weight[targets].float()).sum(-1)
        return z + self.bias[targets].float() if self.bias is not None else z
