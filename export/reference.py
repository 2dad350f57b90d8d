"""The PyTorch twin of an exported tier, rebuilt from the backbone and the export's global arrays.

Used by the parity tests and the train-step benchmark: it is the exact model the tier's ONNX graph
was traced from (same slots, same initial values), so ORT and PyTorch can be compared step for step.
"""

from __future__ import annotations

import copy

import numpy as np

from edge_runtime.manifest import Manifest
from export.backbone import Backbone
from export.model import AdaptedClassifier, LoraClassifier


def reference_model(manifest: Manifest, tier_name: str, backbone: Backbone) -> AdaptedClassifier | LoraClassifier:
    """The model of `tier_name` with its arrays as exported (FFT-MoE: global experts 0..M_t-1 in the
    slots; LoRA: the top rows / columns of the global factors)."""
    if backbone.sha256 != manifest.backbone["sha256"]:
        raise ValueError(f"backbone {backbone.model_id} is not the one {manifest.root} was exported from")
    tier = manifest.tier(tier_name)
    encoder, labels, layers = copy.deepcopy(backbone.model), len(manifest.labels), len(tier.adapted_layers)
    if manifest.is_lora:
        model = LoraClassifier(encoder, labels, rank=tier.rank, adapted_layers=layers,
                               global_rank=max(t.rank for t in manifest.tiers.values()))
    else:
        model = AdaptedClassifier(encoder, labels, rank=manifest.rank, experts=tier.experts_held, top_k=tier.top_k,
                                  adapted_layers=layers, global_experts=manifest.experts)
    with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as arrays:
        model.load_global(dict(arrays))
    return model
