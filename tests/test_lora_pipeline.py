"""The LoRA baselines through the same pipeline as FFT-MoE: export, ORT training, server method, `fftmoe run`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from broker_server.aggregation import AggregationConfig
from broker_server.config import ServerConfig, ServerConfigError
from broker_server.lora_strategies import LORA_A, LORA_B, LORA_PRODUCT
from broker_server.methods import MethodError, make_method
from edge_runtime import wire
from edge_runtime.trainer import LossInputs, TierTrainer
from tests.ort_helpers import batch, ort_session, reference_model
from tests.tiny_model import TINY_TIERS, write_tiny_dataset

BASE = "backbone.encoder.layer.1.intermediate.dense"  # adapted by both tiny tiers


def test_lora_export_manifest(tiny_lora_export):
    m = tiny_lora_export
    assert m.method == "lora" and m.is_lora
    assert m.train_inputs == ("input_ids", "attention_mask", "labels") and m.train_outputs == ("loss", "logits")
    assert {t.name: t.rank for t in m.tiers.values()} == {"small": 2, "big": 4}
    assert all(t.experts_held == 0 for t in m.tiers.values())
    shapes = {p.name: p.shape for p in m.global_params}
    assert shapes[BASE + "." + "fftmoe_lora_A"] == (4, 32)  # r_max rows, d_in
    assert shapes[BASE + "." + "fftmoe_lora_B"] == (64, 4)  # d_out, r_max
    small = {p.name: p.shape for p in m.tier("small").params}
    assert small[BASE + LORA_A] == (2, 32) and small[BASE + LORA_B] == (64, 2)
    assert not any("layer.0" in n for n in small)  # the small tier adapts only the top layer
    with np.load(m.root / m.global_init.path) as init:
        assert not np.any(init[BASE + LORA_B]) and np.any(init[BASE + LORA_A])  # B = 0: starts as the backbone


def test_lora_training_step_matches_pytorch(tiny_lora_export, tiny_model_dir):
    model = reference_model(tiny_lora_export, "big", tiny_model_dir)
    state, module, _ = ort_session(tiny_lora_export, "big")
    rng = np.random.default_rng(3)
    with torch.no_grad():  # B = 0 at export would zero A's gradient: give both factors values
        for name, param in model.adapter_parameters().items():
            value = (rng.standard_normal(tuple(param.shape)) * 0.2).astype(np.float32)
            param.copy_(torch.from_numpy(value))
            state.parameters[name] = value
    inputs = batch(tiny_lora_export, "big")[:3]
    module.train()
    loss, logits = module(*inputs)
    ref_loss, ref_logits = model(*[torch.from_numpy(x) for x in inputs])
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) < 1e-4 * abs(ref_loss.item())
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    for name, param in model.adapter_parameters().items():
        assert np.abs(param.grad.numpy()).max() > 0, name
        np.testing.assert_allclose(state.parameters[name].grad, param.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_trainer_trains_a_lora_tier(tiny_lora_export):
    trainer = TierTrainer(tiny_lora_export.root, "small", threads=1)
    before = trainer.get_params()
    ids, mask, labels = batch(tiny_lora_export, "small")[:3]
    result = trainer.train_round(before, [(ids, mask, labels)] * 3, LossInputs(0.0, 0.0, np.zeros((1, 0))), 1e-2)
    assert result.steps == 3 and result.expert_tokens.shape == (1, 0)
    assert np.any(result.params[BASE + LORA_B] != 0)  # B moved off zero
    loss, acc, seen = trainer.evaluate([(ids, mask, labels)])
    assert seen == len(labels) and np.isfinite(loss)


def _update(tier, arrays, device="d0", samples=10, **override):
    params = {n: np.asarray(a, np.float32) for n, a in arrays.items()}
    params.update(override)
    return wire.Update(device_id=device, round=0, tier=tier, params=params, expert_tokens={}, num_samples=samples)


def test_lora_methods_views_validation_and_rounds(tiny_lora_export):
    m = tiny_lora_export
    with np.load(m.root / m.global_init.path) as data:
        init = {n: data[n] for n in data.files}
    flex = make_method("flexlora", m, AggregationConfig(), gamma=1.0)
    global_ = flex.initial_global(init)
    assert not np.any(global_[BASE + LORA_PRODUCT]) and BASE + LORA_A not in global_
    flex.begin_round(global_)
    small = m.tier("small")
    params, slot_map, target = flex.task_fields(small, None, global_)
    assert slot_map == {} and target == {}
    # a zero product has no singular directions: round 0 hands out the export's initial factors
    np.testing.assert_array_equal(params[BASE + LORA_A], init[BASE + LORA_A][:2])
    assert set(params) == {p.name for p in small.params}

    trained = {n: a + 0.1 for n, a in params.items()}
    update = flex.to_update(_update("small", trained), {}, small)
    assert flex.problems(update, small) == []
    bad = flex.to_update(_update("small", trained, **{"fftmoe_head.extra": np.zeros(2, np.float32)}), {}, small)
    assert any("unexpected array 'fftmoe_head.extra'" in p for p in flex.problems(bad, small))
    nan = {**update.params, BASE + LORA_B: np.full_like(trained[BASE + LORA_B], np.nan)}  # the wire refuses NaN:
    assert any("NaN" in p for p in flex.problems(dataclasses.replace(update, params=nan), small))  # a decoder bug
    flex.strategy.fold(update)
    new, stats = flex.strategy.finish()
    want = trained[BASE + LORA_B].astype(np.float64) @ trained[BASE + LORA_A]
    np.testing.assert_allclose(new[BASE + LORA_PRODUCT], want, rtol=1e-6)
    layer0 = "backbone.encoder.layer.0.intermediate.dense" + LORA_PRODUCT
    np.testing.assert_array_equal(new[layer0], global_[layer0])  # nobody held layer 0: it keeps its value
    # the next round's view is the SVD of the product: a rank-2 client recovers B A exactly (rank <= 2)
    flex.begin_round(new)
    view, _, _ = flex.task_fields(small, None, new)
    np.testing.assert_allclose(view[BASE + LORA_B] @ view[BASE + LORA_A], want, rtol=1e-4, atol=1e-6)

    het = make_method("hetlora", m, AggregationConfig(), gamma=1.0)
    het.begin_round(het.initial_global(init))
    big_view, _, _ = het.task_fields(m.tier("big"), None, init)
    np.testing.assert_array_equal(big_view[BASE + LORA_A], init[BASE + LORA_A])  # rank 4 = r_max: all rows


def test_methods_refuse_the_wrong_export_and_options(tiny_lora_export, tiny_export):
    with pytest.raises(MethodError, match="FedIT runs every client at one rank"):
        make_method("fedit", tiny_lora_export, AggregationConfig(), gamma=1.0)  # ranks 2 and 4
    with pytest.raises(MethodError, match="needs `fftmoe export --method lora`"):
        make_method("hetlora", tiny_export, AggregationConfig(), gamma=1.0)
    with pytest.raises(MethodError, match="LoRA export"):
        make_method("fft-moe", tiny_lora_export, AggregationConfig(), gamma=1.0)
    with pytest.raises(ServerConfigError, match="FFT-MoE options"):
        ServerConfig(artifacts="x", method="hetlora", personalise_router=True)


def test_fftmoe_run_with_a_lora_baseline(tiny_model_dir, tmp_path):
    """`fftmoe run --method flexlora`: the LoRA export, real broker, server and device processes."""
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TINY_TIERS)
    data = write_tiny_dataset(tmp_path / "data.csv", rows=160)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fftmoe.cli", "run", "--model", str(tiny_model_dir), "--tiers", str(tiers),
           "--dataset", str(data), "--fleet", "laptop:1,pi4-4gb:1", "--rounds", "2", "--local-steps", "3",
           "--out", str(out), "--cache", str(tmp_path / "cache"), "--round-deadline-s", "60", "--method", "flexlora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    fleet = json.loads((out / "fleet.json").read_text())
    assert fleet["method"] == "flexlora" and len(fleet["devices"]) == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and all(r["updates"] >= 1 for r in records)  # dropouts: emulated
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records) and records[0]["usage"] == {}
    with np.load(out / "global_adapter.npz") as final:
        assert np.any(final[BASE + LORA_PRODUCT])  # the averaged products moved off zero
    assert (out / "model" / "model.onnx").is_file()

    rejected = subprocess.run(cmd[:-2] + ["--method", "hetlora", "--weighting", "activation"], capture_output=True,
                              text=True, timeout=60)
    assert rejected.returncode == 2 and "FFT-MoE options" in rejected.stderr
