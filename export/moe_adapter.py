"""The sparse Mixture-of-Experts adapter of FFT-MoE and the wrapper that injects it (PyTorch).

This module is the PyTorch definition that gets exported to ONNX; it is also the reference the parity
tests compare ONNX Runtime against. It is not the training loop (the device trains the exported
graph) and it knows nothing about tiers or files.

Every adapter parameter lives under a module whose attribute name starts with `ADAPTER_PREFIX`
(PEFT's `lora_` convention). The trainable-parameter list, the names on the wire and the names the
server aggregates all derive from `is_adapter_param`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PREFIX = "fftmoe_"


def is_adapter_param(name: str) -> bool:
    """True for a parameter that belongs to an FFT-MoE adapter or the head (the trainable set)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


@dataclass
class RoutingStats:
    """What one adapted layer's router did on a batch; the loss is built from these."""

    probs: torch.Tensor  # [B, T, M] router softmax over the held experts
    selected: torch.Tensor  # [B, T, M] 1.0 where the expert is in the token's top-k, else 0.0


class MoEAdapter(nn.Module):
    """M stacked two-layer FFN experts (d -> r -> d) and a top-k router, run parallel to the FFN.

    `y = sum_{e in S(h)} g_e(h) * E_e(h)` with `E_e(h) = W2_e gelu(W1_e h + b1_e) + b2_e`. All experts
    are computed densely with static shapes (M is small) and mixed with the sparse gate, which
    keeps the graph free of data-dependent shapes. W2 and b2 start at zero, so the adapted model
    starts equal to the frozen backbone.
    """

    def __init__(self, hidden: int, rank: int, experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and experts={experts}")
        self.top_k = top_k
        self.w1 = nn.Parameter(torch.randn(experts, hidden, rank) * init_std)  # [M, d, r]
        self.b1 = nn.Parameter(torch.zeros(experts, rank))  # [M, r]
        self.w2 = nn.Parameter(torch.zeros(experts, rank, hidden))  # [M, r, d]
        self.b2 = nn.Parameter(torch.zeros(experts, hidden))  # [M, d]
        self.router = nn.Parameter(torch.randn(experts, hidden) * init_std)  # [M, d]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        logits = torch.matmul(h, self.router.t())  # [B, T, M]
        probs = torch.softmax(logits, dim=-1)  # [B, T, M]
        # Threshold top-k mask: every expert whose probability reaches the k-th largest. It has a
        # gradient path in ORT 1.19.2 (TopK values, GreaterOrEqual, Cast), unlike scatter forms.
        kth = torch.topk(probs, self.top_k, dim=-1).values[..., self.top_k - 1 : self.top_k]  # [B, T, 1]
        selected = (probs >= kth).to(probs.dtype)  # [B, T, M]
        gate = probs * selected  # [B, T, M]
        gate = gate / gate.sum(dim=-1, keepdim=True)  # [B, T, M], renormalised over S(h)

        x = h.unsqueeze(1)  # [B, 1, T, d]
        z = F.gelu(torch.matmul(x, self.w1) + self.b1.unsqueeze(1))  # [B, M, T, r]
        expert_out = torch.matmul(z, self.w2) + self.b2.unsqueeze(1)  # [B, M, T, d]
        weights = gate.permute(0, 2, 1).unsqueeze(-1)  # [B, M, T, 1]
        y = (weights * expert_out).sum(dim=1)  # [B, T, d]
        return y, RoutingStats(probs=probs, selected=selected)


class AdaptedFFNOutput(nn.Module):
    """Wraps a BERT-style FFN output module (dense, dropout, LayerNorm) and adds the MoE adapter.

    The wrapped module computes `LayerNorm(dropout(dense(intermediate)) + h)` where `h` is the
    attention output that fed the FFN. The wrapper returns `LayerNorm(FFN(h) + MoE(h) + h)`, i.e.
    the adapter runs parallel to the frozen FFN on the same input. The last call's routing
    statistics are kept on `last_stats` for the model's loss (they are graph tensors, not state).
    """

    def __init__(self, base_layer: nn.Module, adapter: MoEAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.fftmoe_moe = adapter
        self.last_stats: RoutingStats | None = None

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        ffn = self.base_layer.dropout(self.base_layer.dense(hidden_states))  # [B, T, d]
        moe, self.last_stats = self.fftmoe_moe(input_tensor)  # [B, T, d]
        return self.base_layer.LayerNorm(ffn + moe + input_tensor)
