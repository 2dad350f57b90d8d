"""LoRA adapters for the baselines of METHOD.md (FedIT, HetLoRA, FlexLoRA), exported like FFT-MoE's.

`LoraLinear` wraps a frozen `nn.Linear` W [d_out, d_in] and adds `x A^T B^T`, i.e. `delta W = B A` with
A [r, d_in] and B [d_out, r], under the attribute names `fftmoe_lora_A` / `fftmoe_lora_B` so the
`fftmoe_` adapter prefix (`is_adapter_param`) makes them the trainable set, and the server strategies
(`broker_server/lora_strategies.py`) find them as `<W's name>.fftmoe_lora_A`. `add_lora` puts one on the
FFN input and output projections (`intermediate.dense`, `output.dense`) of the top layers: the same
layers FFT-MoE adapts.

No `alpha / r` scaling (PEFT's default multiplies by alpha / r): HetLoRA and FlexLoRA mix factors of
different ranks, which is only meaningful when a rank component means the same thing at every rank,
so the scale is 1 at every rank. Initialisation as PEFT's default: A uniform in +-1/sqrt(d_in) (its
kaiming_uniform with a = sqrt(5)), B zero, so the adapted model starts equal to the backbone.
This module is the PyTorch definition only: not the exporter, not the aggregation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edge_runtime.manifest import LORA_A, LORA_B  # noqa: F401 (the naming rule; re-exported for export.model)
from export.backbone import BackboneError


class LoraLinear(nn.Module):
    """`base(x) + (x A^T) B^T` with a frozen `base`; A [rank, d_in], B [d_out, rank]."""

    def __init__(self, base_layer: nn.Linear, rank: int):
        super().__init__()
        if not 1 <= rank <= min(base_layer.in_features, base_layer.out_features):
            raise ValueError(f"LoRA rank {rank} must be in [1, {min(base_layer.in_features, base_layer.out_features)}]")
        self.base_layer = base_layer
        self.fftmoe_lora_A = nn.Parameter(torch.zeros(rank, base_layer.in_features))  # filled from the global init
        self.fftmoe_lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + torch.matmul(torch.matmul(x, self.fftmoe_lora_A.t()), self.fftmoe_lora_B.t())


def add_lora(encoder: nn.Module, rank: int, adapted_layers: int) -> list[LoraLinear]:
    """Wrap the FFN input and output projections of the top `adapted_layers` BERT-style layers."""
    layers = encoder.encoder.layer
    if not 1 <= adapted_layers <= len(layers):
        raise ValueError(f"adapted_layers={adapted_layers} must be between 1 and {len(layers)}")
    wrapped = []
    for index in range(len(layers) - adapted_layers, len(layers)):
        for parent in (layers[index].intermediate, layers[index].output):
            base = getattr(parent, "dense", None)
            if not isinstance(base, nn.Linear):
                raise BackboneError(f"layer {index}: {type(parent).__name__}.dense is not a Linear; LoRA needs "
                                    "a BERT-style FFN")
            parent.dense = LoraLinear(base, rank)
            wrapped.append(parent.dense)
    return wrapped


def initial_lora_a(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The initial global A [r_max, d_in]: uniform in +-1/sqrt(d_in) (B starts at zero). A tier at rank r
    takes the top r rows of A and columns of B, so every rank starts from the same function."""
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, shape).astype(np.float32)
