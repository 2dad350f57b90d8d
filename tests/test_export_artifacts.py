"""What `export_all` writes: complete tier folders, a truthful manifest, and models that behave."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edge_runtime.manifest import ArtifactIntegrityError, ManifestError, load_manifest, verify_tier
from tests.ort_helpers import batch, ort_session, reference_model
from tests.tiny_model import LABELS


def test_manifest_describes_every_tier_and_file(tiny_export):
    manifest = load_manifest(tiny_export.root)  # read back from disk, as a device would
    assert manifest.labels == LABELS
    assert list(manifest.tiers) == ["small", "big"]
    small, big = manifest.tier("small"), manifest.tier("big")
    assert small.adapted_layers == (1,) and big.adapted_layers == (0, 1)
    for tier in (small, big):
        verify_tier(manifest, tier.name)
        assert set(tier.files) == {"training_model", "eval_model", "optimizer_model", "checkpoint",
                                   "inference_model", "tokenizer"}
        assert tier.measured["peak_rss_mb"] > 0 and tier.measured["step_ms"] > 0
        assert tier.measured["torch_imported"] is False
        for p in tier.params:
            assert p.name.startswith("fftmoe_head") or p.shape[0] == tier.experts_held
    assert manifest.versions["onnxruntime-training-cpu"] == "1.19.2"
    assert len(manifest.backbone["sha256"]) == 64


def test_global_init_covers_every_tier_parameter(tiny_export):
    with np.load(tiny_export.root / tiny_export.global_init.path, allow_pickle=False) as arrays:
        shapes = {name: arrays[name].shape for name in arrays.files}
    for p in tiny_export.global_params:
        assert shapes[p.name] == p.shape
    for tier in tiny_export.tiers.values():
        for p in tier.params:
            want = p.shape if p.slot_axis is None else (tiny_export.experts, *p.shape[1:])
            assert shapes[p.name] == want


def test_corrupt_artifact_is_named(tiny_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export.root, copy)
    ckpt = copy / "small" / "checkpoint"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(ArtifactIntegrityError, match="small/checkpoint"):
        verify_tier(load_manifest(copy), "small")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json"):
        load_manifest(copy)


def test_eval_and_inference_models_match_pytorch(tiny_export, tiny_model_dir):
    from edge_runtime import _ort

    model = reference_model(tiny_export, "big", tiny_model_dir)
    inputs = batch(tiny_export, "big")
    with torch.no_grad():
        want = model.logits(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1])).numpy()
    _, module, _ = ort_session(tiny_export, "big")
    module.eval()
    np.testing.assert_allclose(module(*inputs)[1], want, rtol=1e-4, atol=1e-5)
    session = _ort.InferenceSession(str(tiny_export.root / "big" / "inference_model.onnx"),
                                    providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    logits = session.run(["logits"], {"input_ids": inputs[0], "attention_mask": inputs[1]})[0]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_training_changes_only_adapters_and_head(tiny_export):
    from edge_runtime import _ort

    tier = tiny_export.tier("big")
    state, module, optimizer = ort_session(tiny_export, "big")
    before = _ort.CheckpointState.load_checkpoint(str(tiny_export.root / "big" / "checkpoint"))
    module.train()
    for step in range(3):
        module(*batch(tiny_export, "big", seed=step))
        optimizer.step()
        module.lazy_reset_grad()
    trainable = {p.name for p in tier.params}
    frozen = [name for name, _ in before.parameters if name not in trainable]  # iteration yields pairs
    assert len(frozen) > 20  # the whole backbone is in the checkpoint, once
    for name in frozen:
        np.testing.assert_array_equal(state.parameters[name].data, before.parameters[name].data, err_msg=name)
    changed = [n for n in trainable if not np.array_equal(state.parameters[n].data, before.parameters[n].data)]
    # W2 starts at zero, so after 3 steps every array has moved except none: all must change.
    assert sorted(changed) == sorted(trainable)
