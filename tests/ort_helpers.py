"""Helpers for tests that train exported tiers with ONNX Runtime and compare against PyTorch."""

from __future__ import annotations

import numpy as np


def reference_model(manifest, tier_name: str, model_dir):
    """The PyTorch model a tier was exported from (see export.reference)."""
    from export.backbone import load_backbone
    from export.reference import reference_model as build

    return build(manifest, tier_name, load_backbone(str(model_dir)))


def batch(manifest, tier_name: str, size: int = 5, seq: int = 12, seed: int = 1):
    """A random batch with padding, as numpy arrays in training-graph input order."""
    tier = manifest.tier(tier_name)
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, manifest.backbone["vocab_size"], (size, seq), dtype=np.int64)
    mask = np.ones((size, seq), dtype=np.int64)
    mask[1, seq // 2:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    labels = rng.integers(0, len(manifest.labels), (size,), dtype=np.int64)
    target = rng.dirichlet(np.ones(tier.experts_held), len(tier.adapted_layers)).astype(np.float32)
    return [ids, mask, labels, np.array(0.05, np.float32), np.array(0.1, np.float32), target]


def ort_session(manifest, tier_name: str):
    """(state, module, optimizer) for a tier, loaded from its artifact files."""
    from edge_runtime import _ort

    folder = manifest.root / tier_name
    state = _ort.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = _ort.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"),
                         session_options=_ort.session_options(1))
    optimizer = _ort.Optimizer(str(folder / "optimizer_model.onnx"), module)
    return state, module, optimizer
