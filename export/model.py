"""The exported training model: frozen encoder + MoE adapters + head, with the FFT-MoE loss inside.

`AdaptedClassifier.forward` is exactly the graph a device trains: it returns the total loss (first
output, as ORT's gradient builder requires), the class logits and the per-expert token counts. The
loss weights and the heterogeneity target are inputs, so the server can schedule them per round
without a new export. It is not a loader (see `backbone.py`) and not an exporter (`onnx_export.py`).

Loss (METHOD.md): `CE + lambda_bal * L_bal + lambda_het * L_het`, both auxiliaries averaged over
adapted layers and over non-pad tokens.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.backbone import ffn_output_modules
from export.lora_adapter import LORA_A, LORA_B, add_lora, initial_lora_a
from export.moe_adapter import AdaptedFFNOutput, MoEAdapter, RoutingStats, is_adapter_param

# Inputs and outputs of the training graph, in order. The device runtime feeds and reads these
# names; the manifest records them.
TRAIN_INPUTS = ("input_ids", "attention_mask", "labels", "lambda_bal", "lambda_het", "het_target")
TRAIN_OUTPUTS = ("loss", "logits", "expert_tokens")
INFER_INPUTS = ("input_ids", "attention_mask")
INFER_OUTPUTS = ("logits",)
# The LoRA baselines' graph: plain cross-entropy, no routing.
LORA_TRAIN_INPUTS = TRAIN_INPUTS[:3]
LORA_TRAIN_OUTPUTS = TRAIN_OUTPUTS[:2]
METHODS = ("fft-moe", "lora")  # what an export adapts with

_EPS = 1e-9
_INIT_STD = 0.02  # normal init of the expert input projection, router rows and head weight
_ZERO_INIT = ("b1", "w2", "b2", "bias", LORA_B)  # W2, b2 and LoRA's B at zero: the model starts as the backbone


def initial_global_value(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The initial value of one global adapter/head array, a pure function of (name, shape, seed).

    Every tier slices its slots out of these arrays, so all tiers and the server start from one
    global model whatever order the tiers are exported in.
    """
    if name.rsplit(".", 1)[-1] in _ZERO_INIT:
        return np.zeros(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith(LORA_A):
        return initial_lora_a(shape, rng)
    return (rng.standard_normal(shape) * _INIT_STD).astype(np.float32)


class _HeadedEncoder(nn.Module):
    """A frozen encoder and a linear head on the masked mean of its last hidden state."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = encoder
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.fftmoe_head = nn.Linear(encoder.config.hidden_size, num_labels)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable arrays by name: every adapter parameter and the head."""
        return {n: p for n, p in self.named_parameters() if is_adapter_param(n)}

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] for a batch of token ids [B, T] and its padding mask [B, T]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, d]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, d]
        return self.fftmoe_head(pooled)  # [B, C]

    def global_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the global array `name` this model's parameter is a slice of."""
        raise NotImplementedError

    def load_global(self, global_arrays: dict[str, np.ndarray]) -> None:
        """Fill the trainable arrays from global arrays, as a device starts round 0."""
        raise NotImplementedError


class AdaptedClassifier(_HeadedEncoder):
    """A frozen encoder whose last `adapted_layers` FFNs carry an MoE adapter, plus a linear head.

    `experts` is the number of slots this tier holds (M_t), `top_k` its k_t; `global_experts` is M.
    """

    train_inputs, train_outputs = TRAIN_INPUTS, TRAIN_OUTPUTS

    def __init__(self, encoder: nn.Module, num_labels: int, rank: int, experts: int, top_k: int,
                 adapted_layers: int, global_experts: int | None = None):
        super().__init__(encoder, num_labels)
        outputs = ffn_output_modules(encoder)
        if not 1 <= adapted_layers <= len(outputs):
            raise ValueError(f"adapted_layers={adapted_layers} must be between 1 and {len(outputs)}")
        hidden = encoder.config.hidden_size
        self.adapted: list[AdaptedFFNOutput] = []
        for layer_index in range(len(outputs) - adapted_layers, len(outputs)):
            parent, attr, base = outputs[layer_index]
            wrapped = AdaptedFFNOutput(base, MoEAdapter(hidden, rank, experts, top_k))
            setattr(parent, attr, wrapped)
            self.adapted.append(wrapped)
        self.num_experts, self.rank = experts, rank
        self.global_experts = global_experts or experts

    def global_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.adapter_parameters()[name].shape)
        return shape if name.startswith("fftmoe_head") else (self.global_experts, *shape[1:])

    def load_global(self, global_arrays: dict[str, np.ndarray]) -> None:
        self.load_global_slots(global_arrays, list(range(self.num_experts)))  # round 0's default slots

    def load_global_slots(self, global_arrays: dict[str, np.ndarray], slots: list[int]) -> None:
        """Fill this tier's slots from global arrays ([M, ...] stacks); the head is copied whole."""
        with torch.no_grad():
            for name, param in self.adapter_parameters().items():
                value = global_arrays[name]
                if name.startswith("fftmoe_head"):
                    param.copy_(torch.from_numpy(value))
                else:
                    param.copy_(torch.from_numpy(value[slots]))

    def example_inputs(self, batch: int, seq_len: int, vocab: int) -> tuple:
        layers = len(self.adapted)
        het_target = torch.full((layers, self.num_experts), 1.0 / self.num_experts)
        return (*_text_inputs(batch, seq_len, vocab), torch.tensor(0.01), torch.tensor(0.01), het_target)

    def forward(self, input_ids, attention_mask, labels, lambda_bal, lambda_het, het_target):
        logits = self.logits(input_ids, attention_mask)  # [B, C]
        ce = F.cross_entropy(logits, labels)
        token_mask = attention_mask.to(logits.dtype)  # [B, T]
        stats = [layer.last_stats for layer in self.adapted]
        bal, het, tokens = routing_losses(stats, token_mask, het_target)
        loss = ce + lambda_bal * bal + lambda_het * het
        return loss, logits, tokens


class LoraClassifier(_HeadedEncoder):
    """The LoRA baselines' model: LoRA of `rank` on the FFN projections of the top `adapted_layers`
    layers (export/lora_adapter.py) and the same head; loss = cross-entropy. The global factors are at
    `global_rank` (r_max); this tier takes the top `rank` rows of A and columns of B."""

    train_inputs, train_outputs = LORA_TRAIN_INPUTS, LORA_TRAIN_OUTPUTS

    def __init__(self, encoder: nn.Module, num_labels: int, rank: int, adapted_layers: int,
                 global_rank: int | None = None):
        super().__init__(encoder, num_labels)
        self.adapted = add_lora(encoder, rank, adapted_layers)
        self.rank, self.global_rank = rank, global_rank or rank

    def global_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.adapter_parameters()[name].shape)
        if name.endswith(LORA_A):
            return (self.global_rank, shape[1])
        return (shape[0], self.global_rank) if name.endswith(LORA_B) else shape

    def load_global(self, global_arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, param in self.adapter_parameters().items():
                value = global_arrays[name]
                if name.endswith(LORA_A):
                    value = value[: self.rank]  # [r, d_in]
                elif name.endswith(LORA_B):
                    value = value[:, : self.rank]  # [d_out, r]
                param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def example_inputs(self, batch: int, seq_len: int, vocab: int) -> tuple:
        return _text_inputs(batch, seq_len, vocab)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.logits(input_ids, attention_mask)  # [B, C]
        return F.cross_entropy(logits, labels), logits


def _text_inputs(batch: int, seq_len: int, vocab: int) -> tuple:
    """input_ids, attention_mask, labels with the training graph's shapes and dtypes, for tracing."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    attention_mask[0, seq_len // 2:] = 0  # one padded row, so masking is traced
    labels = torch.zeros(batch, dtype=torch.int64)
    return input_ids, attention_mask, labels


def routing_losses(stats: list[RoutingStats], token_mask: torch.Tensor, het_target: torch.Tensor):
    """Balance loss, heterogeneity loss (both layer means) and token counts [L, M] over non-pad tokens.

    `het_target` [L, M] is q per layer: the distribution over held experts this client should
    lean toward (computed from the server's global usage; see METHOD.md).
    """
    n_tokens = token_mask.sum().clamp(min=1.0)
    bal_terms, het_terms, counts = [], [], []
    for layer, s in enumerate(stats):
        m = token_mask.unsqueeze(-1)  # [B, T, 1]
        count = (s.selected * m).sum(dim=(0, 1))  # [M] token selections per expert
        share = count / count.sum().clamp(min=1.0)  # [M] f_e
        mean_prob = (s.probs * m).sum(dim=(0, 1)) / n_tokens  # [M] P_e
        experts = s.probs.shape[-1]
        bal_terms.append(experts * (share * mean_prob).sum())
        q = het_target[layer]  # [M]
        het_terms.append((q * (torch.log(q.clamp(min=_EPS)) - torch.log(mean_prob + _EPS))).sum())
        counts.append(count)
    bal = torch.stack(bal_terms).mean()
    het = torch.stack(het_terms).mean()
    return bal, het, torch.stack(counts)  # [L, M]
