"""The PyTorch twin of an exported tier, rebuilt from the backbone and the export's global arrays.

Used by the parity tests and the train-step benchmark: it is the exact model the tier's ONNX graph
was traced from (same slots, same initial values), so ORT and PyTorch can be compared step for step.
"""

from __future__ import annotations

import copy

import numpy as np

from edge_runtime.manifest import Manifest
from export.backbone import Backbone
from export.model import AdaptedClassifier


def reference_model(manifest: Manifest, tier_name: str, backbone: Backbone) -> AdaptedClassifier:
    """AdaptedClassifier for `tier_name` with the slots filled as exported (global experts 0..M_t-1)."""
    if backbone.sha256 != manifest.backbone["sha256"]:
        raise ValueError(f"backbone {backbone.model_id} is not the one {manifest.root} was exported from")
    tier = manifest.tier(tier_name)
    model = AdaptedClassifier(copy.deepcopy(backbone.model), num_labels=len(manifest.labels), rank=manifest.rank,
                              experts=tier.experts_held, top_k=tier.top_k, adapted_layers=len(tier.adapted_layers))
    with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as arrays:
        model.load_global_slots(dict(arrays), list(range(tier.experts_held)))
    return model
