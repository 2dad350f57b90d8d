"""ONNX Runtime training agrees with PyTorch on the exported model: one step, then 20 AdamW steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.ort_helpers import batch, ort_session, reference_model

TIER = "big"  # 2 adapted layers, 4 slots, top-2: exercises the mask, both losses and every layer


def _randomise(model, state, seed=3):
    """Give every trainable array non-trivial values on both sides (W2 starts at zero, which would
    make most gradients zero and the comparison weak)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in model.adapter_parameters().items():
            value = (rng.standard_normal(tuple(param.shape)) * 0.2).astype(np.float32)
            param.copy_(torch.from_numpy(value))
            state.parameters[name] = value


def _relative_error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def test_one_step_matches_pytorch(tiny_export, tiny_model_dir):
    model = reference_model(tiny_export, TIER, tiny_model_dir)
    state, module, _ = ort_session(tiny_export, TIER)
    _randomise(model, state)
    inputs = batch(tiny_export, TIER)

    module.train()
    loss, logits, tokens = module(*inputs)
    ref_loss, ref_logits, ref_tokens = model(*[torch.from_numpy(x) for x in inputs])
    ref_loss.backward()

    assert _relative_error(np.asarray(loss), ref_loss.detach().numpy()) < 1e-4
    assert _relative_error(logits, ref_logits.detach().numpy()) < 1e-4
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())
    assert tokens.sum() == 2 * int(inputs[1].sum()) * len(tiny_export.tier(TIER).adapted_layers)  # top-2 per token
    for name, param in model.adapter_parameters().items():
        assert np.abs(param.grad.numpy()).max() > 0, f"{name} has a zero gradient: the test would be vacuous"
        assert _relative_error(state.parameters[name].grad, param.grad.numpy()) < 1e-4, name


def test_twenty_adamw_steps_track_pytorch(tiny_export, tiny_model_dir):
    model = reference_model(tiny_export, TIER, tiny_model_dir)
    state, module, optimizer = ort_session(tiny_export, TIER)
    _randomise(model, state)
    lr = 1e-3
    optimizer.set_learning_rate(lr)
    # ORT's AdamW: betas (0.9, 0.999), eps 1e-6, no weight decay, bias correction on.
    reference = torch.optim.AdamW(model.adapter_parameters().values(), lr=lr, betas=(0.9, 0.999), eps=1e-6,
                                  weight_decay=0.0)
    module.train()
    ort_losses, torch_losses = [], []
    for step in range(20):
        inputs = batch(tiny_export, TIER, seed=100 + step)
        loss = module(*inputs)[0]
        optimizer.step()
        module.lazy_reset_grad()
        reference.zero_grad()
        ref_loss = model(*[torch.from_numpy(x) for x in inputs])[0]
        ref_loss.backward()
        reference.step()
        ort_losses.append(float(loss))
        torch_losses.append(ref_loss.item())
    np.testing.assert_allclose(ort_losses, torch_losses, atol=1e-3)
    assert ort_losses[-1] != pytest.approx(ort_losses[0], abs=1e-3), "training did not move the loss"
