"""FFT-MoE aggregation on a tiny parameter space: hand-computed merges, optimiser, usage, validation.

Space: one adapted layer with M=4 experts, d=2, r=1, and a 2-class head, so every expected array can be
written down. Client arrays hold one constant per slot row, which makes the weighted averages exact (the
float32 sums of small integers times halves are exact too). Larger random rounds are compared with a float64
batch average at the tolerance float32 accumulation gives (module docstring of broker_server/accumulate.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker_server import aggregation, fold_plan
from broker_server.accumulate import SPILL_EVERY, slot_runs
from broker_server.aggregation import (AggregationConfig, ClientUpdate, FftMoeStrategy, ParamSpace, delta_norm,
                                       het_target)
from broker_server.update_checks import validate_update
from broker_server.bench_aggregate import builtin_space

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "backbone.encoder.layer.0.output.fftmoe_moe."
HEAD_W, HEAD_B = "fftmoe_head.weight", "fftmoe_head.bias"


def tiny_space(layers: int = 1) -> ParamSpace:
    return builtin_space(hidden=2, rank=1, experts=4, layers=layers, classes=2)


def global_arrays(space: ParamSpace) -> dict[str, np.ndarray]:
    """Every element distinct, so a block that keeps its value is recognisable."""
    out, start = {}, 0
    for p in space.entries:
        n = math.prod(p.shape)
        out[p.name] = (np.arange(start, start + n, dtype=np.float32) / 100).reshape(p.shape)
        start += n
    return out


def client(space: ParamSpace, slots: list[int], row_values: list[float], head_value: float, samples: int,
           tokens: list[float] | None = None, device: str = "dev") -> ClientUpdate:
    """An update whose slot row i is `row_values[i]` everywhere, head all `head_value` (layer 0 only)."""
    params = {}
    for name, shape in space.tier_shapes([0], len(slots)).items():
        if name.startswith("fftmoe_head"):
            params[name] = np.full(shape, head_value, np.float32)
        else:
            rows = np.asarray(row_values, np.float32).reshape(-1, *([1] * (len(shape) - 1)))  # [M_t, 1, ...]
            params[name] = np.broadcast_to(rows, shape).astype(np.float32)
    return ClientUpdate(device_id=device, params=params, slot_map={0: list(slots)}, num_samples=samples,
                        expert_tokens={0: np.asarray(tokens if tokens is not None else [1.0] * len(slots))})


def run(space, config, updates, start=None):
    strategy = FftMoeStrategy(space, config)
    strategy.begin_round(start if start is not None else global_arrays(space))
    for u in updates:
        strategy.fold(u)
    return strategy.finish()


def expert_rows(arrays, space, layer=0):
    """{name suffix: [M, ...]} of one layer, for row-wise assertions."""
    return {p.name.rsplit(".", 1)[1]: arrays[p.name] for p in space.by_layer[layer]}


def assert_row(arr: np.ndarray, row: int, value) -> None:
    np.testing.assert_array_equal(arr[row], np.full(arr.shape[1:], value, np.float32))


# two overlapping clients: A holds experts {0, 1} with 1 sample, B holds {2, 1} (slot order!) with 3
A = dict(slots=[0, 1], row_values=[1.0, 2.0], head_value=1.0, samples=1, tokens=[3.0, 1.0], device="A")
B = dict(slots=[2, 1], row_values=[4.0, 6.0], head_value=5.0, samples=3, tokens=[4.0, 0.0], device="B")


def test_samples_weighting_overlapping_clients_and_unheld_expert_keeps_value():
    space = tiny_space()
    start = global_arrays(space)
    new, stats = run(space, AggregationConfig(), [client(space, **A), client(space, **B)], start)
    for suffix, arr in expert_rows(new, space).items():
        assert_row(arr, 0, 1.0)  # only A
        assert_row(arr, 1, (1 * 2.0 + 3 * 6.0) / 4)  # 5.0: both, weighted by samples
        assert_row(arr, 2, 4.0)  # only B, through B's slot 0
        np.testing.assert_array_equal(arr[3], start[PREFIX + suffix][3])  # nobody: unchanged
    np.testing.assert_array_equal(new[HEAD_W], np.full((2, 2), (1 * 1.0 + 3 * 5.0) / 4, np.float32))
    np.testing.assert_array_equal(new[HEAD_B], np.full((2,), 4.0, np.float32))
    assert (stats.clients, stats.samples, stats.held_experts) == (2, 4, {0: 3})
    assert all(a.dtype == np.float32 for a in new.values())


def test_activation_weighting_uses_routed_tokens_and_head_uses_samples():
    space = tiny_space()
    start = global_arrays(space)
    a = dict(A, tokens=[0.0, 1.0])  # A routed nothing to expert 0
    b = dict(B, tokens=[5.0, 3.0])
    new, stats = run(space, AggregationConfig(weighting="activation"), [client(space, **a), client(space, **b)], start)
    for suffix, arr in expert_rows(new, space).items():
        np.testing.assert_array_equal(arr[0], start[PREFIX + suffix][0])  # zero weight: as if not held
        assert_row(arr, 1, (1 * 2.0 + 3 * 6.0) / 4)  # tokens 1 (A) and 3 (B): 5.0
        assert_row(arr, 2, 4.0)
    np.testing.assert_array_equal(new[HEAD_B], np.full((2,), 4.0, np.float32))  # samples, not tokens
    assert stats.held_experts == {0: 2}
    # under samples weighting the zero-token block is merged like any other
    new_s, _ = run(space, AggregationConfig(weighting="samples"), [client(space, **a), client(space, **b)], start)
    assert_row(expert_rows(new_s, space)["w1"], 0, 1.0)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_label_counts_weigh_each_head_row_and_a_row_nobody_has_keeps_its_value(exact, dtype):
    """A reports labels (1, 0), B (1, 2): row 0 averages both by their samples of label 0, row 1 is B's
    alone; experts keep the samples rule. With C (no counts) in the round, it weighs every row by its 4."""
    space = tiny_space()
    start = global_arrays(space)
    a = _with(client(space, **A), label_counts=np.array([1.0, 0.0]))
    b = _with(client(space, **B), label_counts=np.array([1.0, 2.0]))
    a, b = (_with(u, params={k: v.astype(dtype) for k, v in u.params.items()}) for u in (a, b))
    config = AggregationConfig(exact=exact)
    new, _ = run(space, config, [a, b], start)
    np.testing.assert_array_equal(new[HEAD_B], np.array([(1 * 1.0 + 1 * 5.0) / 2, 5.0], np.float32))
    np.testing.assert_array_equal(new[HEAD_W], np.array([[3.0, 3.0], [5.0, 5.0]], np.float32))
    assert_row(new[PREFIX + "w1"], 1, (1 * 2.0 + 3 * 6.0) / 4)  # experts: samples, as without counts
    only_label_0 = _with(b, label_counts=np.array([3.0, 0.0]))
    new, _ = run(space, config, [a, only_label_0], start)
    np.testing.assert_array_equal(new[HEAD_B], np.array([(1 * 1.0 + 3 * 5.0) / 4, start[HEAD_B][1]], np.float32))
    np.testing.assert_array_equal(new[HEAD_W][1], start[HEAD_W][1])  # nobody holds label 1: unchanged
    c = client(space, **dict(B, head_value=9.0, samples=4, device="C"))
    new, _ = run(space, config, [a, b, c], start)
    np.testing.assert_array_equal(new[HEAD_B], np.array([(1 + 5 + 4 * 9.0) / 6, (2 * 5.0 + 4 * 9.0) / 6],
                                                        np.float32))


def test_label_counts_of_the_wrong_length_are_refused_before_any_sum_changes():
    space = tiny_space()
    strategy = FftMoeStrategy(space)
    strategy.begin_round(global_arrays(space))
    with pytest.raises(ValueError, match="label_counts: shape"):
        strategy.fold(_with(client(space, **A), label_counts=np.array([1.0, 0.0, 0.0])))
    strategy.fold(client(space, **B))
    new, stats = strategy.finish()
    assert stats.clients == 1 and new[HEAD_B].tolist() == [5.0, 5.0]


def test_activation_and_samples_differ_on_expert_one():
    space = tiny_space()
    b = dict(B, tokens=[4.0, 1.0])
    new, _ = run(space, AggregationConfig(weighting="activation"), [client(space, **A), client(space, **b)])
    assert_row(expert_rows(new, space)["w2"], 1, (1 * 2.0 + 1 * 6.0) / 2)  # 4.0, not the samples' 5.0


def test_router_personalisation_keeps_global_router_rows():
    space = tiny_space()
    start = global_arrays(space)
    new, _ = run(space, AggregationConfig(personalise_router=True), [client(space, **A), client(space, **B)], start)
    np.testing.assert_array_equal(new[PREFIX + "router"], start[PREFIX + "router"])
    assert_row(new[PREFIX + "w1"], 1, 5.0)  # experts still merged
    new_all, _ = run(space, AggregationConfig(), [client(space, **A), client(space, **B)], start)
    assert_row(new_all[PREFIX + "router"], 1, 5.0)


def test_router_lr_damps_only_the_router_rows():
    space = tiny_space()
    start = global_arrays(space)
    router = PREFIX + "router"
    new, _ = run(space, AggregationConfig(router_lr=0.25), [client(space, **A), client(space, **B)], start)
    x = start[router].astype(np.float64)
    np.testing.assert_allclose(new[router][1], x[1] + 0.25 * (5.0 - x[1]), rtol=1e-6)  # a quarter of the way
    np.testing.assert_allclose(new[router][0], x[0] + 0.25 * (1.0 - x[0]), rtol=1e-6)
    np.testing.assert_array_equal(new[router][3], start[router][3])  # not held: no step
    assert_row(new[PREFIX + "w1"], 1, 5.0)  # experts and head take the full average
    np.testing.assert_array_equal(new[HEAD_B], np.full((2,), 4.0, np.float32))
    frozen, _ = run(space, AggregationConfig(router_lr=0.0), [client(space, **A), client(space, **B)], start)
    np.testing.assert_array_equal(frozen[router], start[router])
    with pytest.raises(ValueError, match="router_lr"):
        AggregationConfig(router_lr=1.5)
    with pytest.raises(ValueError, match="router_lr is a FedAvg option"):
        AggregationConfig(router_lr=0.5, optimizer="fedadam")


def test_fedadam_one_step_matches_hand_computation_and_state_round_trips():
    space = tiny_space()
    start = {n: np.zeros_like(a) for n, a in global_arrays(space).items()}
    cfg = AggregationConfig(optimizer="fedadam", server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    strategy = FftMoeStrategy(space, cfg)
    strategy.begin_round(start)
    strategy.fold(client(space, slots=[0, 1], row_values=[1.0, -2.0], head_value=0.5, samples=2))
    new, stats = strategy.finish()
    # delta d = aggregate - 0; m = 0.1 d; v = 0.01 d^2; x = 0 + 0.01 * m / (sqrt(v) + 1e-3)
    for row, d in ((0, 1.0), (1, -2.0)):  # 1 - 0.9 is not exactly 0.1 in binary: compare to 1e-6
        np.testing.assert_allclose(new[PREFIX + "w1"][row], 0.01 * 0.1 * d / (0.1 * abs(d) + 1e-3), rtol=1e-6)
    assert_row(new[PREFIX + "b2"], 2, 0.0)  # not held: no step
    np.testing.assert_allclose(new[HEAD_B], 0.01 * 0.05 / (0.1 * 0.5 + 1e-3), rtol=1e-6)
    state = strategy.optimizer_state()
    np.testing.assert_allclose(state[f"fedadam.m.{PREFIX}w1"][:, 0, 0], [0.1, -0.2, 0.0, 0.0])
    np.testing.assert_allclose(state[f"fedadam.v.{PREFIX}w1"][:, 0, 0], [0.01, 0.04, 0.0, 0.0])
    assert stats.pseudo_grad_norm > 0 and int(state["rounds"]) == 1
    # a restored strategy takes the same second step, bit for bit
    second = client(space, slots=[1, 3], row_values=[0.5, 0.25], head_value=0.0, samples=1)
    restored = FftMoeStrategy(space, cfg)
    restored.load_optimizer_state(dict(np.load(_npz(state), allow_pickle=False)))
    for s in (strategy, restored):
        s.begin_round(new)
        s.fold(second)
    a, b = strategy.finish()[0], restored.finish()[0]
    assert all(np.array_equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="keys differ"):
        restored.load_optimizer_state({k: v for k, v in state.items() if k != "rounds"})


def _npz(state):
    import io

    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    return buf


def test_usage_share_entropy_and_ema():
    space = tiny_space()
    strategy = FftMoeStrategy(space, AggregationConfig(usage_decay=0.5))
    strategy.begin_round(global_arrays(space))
    strategy.fold(client(space, **A))  # tokens: e0 3, e1 1
    strategy.fold(client(space, **B))  # tokens: e2 4, e1 0
    new, stats = strategy.finish()
    share = np.array([3, 1, 4, 0]) / 8
    np.testing.assert_allclose(stats.usage_share[0], share)
    assert stats.usage_entropy[0] == pytest.approx(-(3 / 8 * math.log(3 / 8) + 1 / 8 * math.log(1 / 8)
                                                     + 1 / 2 * math.log(1 / 2)))
    np.testing.assert_allclose(strategy.usage[0], 0.5 * 0.25 + 0.5 * share)
    # a round where nobody routed anything leaves the usage as it was
    before = strategy.usage[0].copy()
    strategy.begin_round(new)
    strategy.fold(client(space, **dict(A, tokens=[0.0, 0.0])))
    _, stats2 = strategy.finish()
    np.testing.assert_array_equal(strategy.usage[0], before)
    assert stats2.usage_entropy == {}
    strategy.load_usage({"0": [0.1, 0.2, 0.3, 0.4]})
    np.testing.assert_array_equal(strategy.usage[0], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError):
        strategy.load_usage({"7": [0.25] * 4})


def test_het_target():
    usage = np.array([0.5, 0.3, 0.2, 0.0])
    # (0.0 + 0.1)^-1 = 10 and (0.5 + 0.1)^-1 = 5/3: q = [6/7, 1/7], under-used expert first
    np.testing.assert_allclose(het_target(usage, [3, 0], gamma=1.0, eps=0.1), [6 / 7, 1 / 7])
    np.testing.assert_allclose(het_target(usage, [0, 1, 2], gamma=0.0), [1 / 3] * 3)
    q = het_target(usage, [0, 1, 2, 3], gamma=2.0, eps=1e-3)
    assert q.sum() == pytest.approx(1.0) and list(np.argsort(q)) == [0, 1, 2, 3]
    for bad in (dict(slots=[0, 0]), dict(slots=[4]), dict(slots=[0], gamma=-1.0), dict(slots=[0], eps=0.0)):
        with pytest.raises(ValueError):
            het_target(usage, **{"gamma": 1.0, "eps": 1e-3, **bad})


def _good():
    space = tiny_space()
    return space, client(space, **A), space.tier_shapes([0], 2)


def _with(update, **changes):
    fields = dict(device_id=update.device_id, params=dict(update.params), slot_map=dict(update.slot_map),
                  num_samples=update.num_samples, expert_tokens=dict(update.expert_tokens),
                  label_counts=update.label_counts)
    fields.update(changes)
    return ClientUpdate(**fields)


def _params(update, name, value):
    params = dict(update.params)
    if value is None:
        del params[name]
    else:
        params[name] = value
    return params


W1, B1 = PREFIX + "w1", PREFIX + "b1"
def test_float16_update_is_valid_and_folds():
    space, good, expected = _good()
    half = _with(good, params={n: a.astype(np.float16) for n, a in good.params.items()})
    assert validate_update(half, expected, space.experts) == []
    new, _ = run(space, AggregationConfig(), [half])
    assert_row(new[W1], 1, 2.0)


def test_norm_clip_fixed_bound_and_median_of_previous_round():
    space = tiny_space()
    start = {n: np.zeros_like(a) for n, a in global_arrays(space).items()}
    one = client(space, slots=[0, 1], row_values=[1.0, 1.0], head_value=1.0, samples=1)
    elements = sum(a.size for a in one.params.values())
    assert delta_norm(one, start, space) == pytest.approx(math.sqrt(elements))
    bound = math.sqrt(elements) / 4
    new, stats = run(space, AggregationConfig(clip_bound=bound), [one], start)
    assert stats.clipped == 1 and stats.clip_bound == pytest.approx(bound)
    assert_row(new[W1], 0, 0.25)  # g + (bound / norm) * (x - g) = 0 + 0.25 * 1
    np.testing.assert_allclose(new[HEAD_W], 0.25)
    # median rule: round 1 is unclipped and sets the median; round 2 clips to 0.5 x that median
    strategy = FftMoeStrategy(space, AggregationConfig(clip_multiplier=0.5))
    strategy.begin_round(start)
    strategy.fold(one)
    _, first = strategy.finish()
    assert first.clipped == 0 and first.clip_bound is None
    strategy.begin_round(start)
    strategy.fold(one)
    new2, second = strategy.finish()
    assert second.clipped == 1 and second.clip_bound == pytest.approx(0.5 * math.sqrt(elements))
    assert_row(new2[W1], 1, 0.5)
    assert float(strategy.optimizer_state()["clip.prev_median"]) == pytest.approx(math.sqrt(elements))


def _random_updates(space: ParamSpace, count: int, seed: int, labels: bool = False) -> list[ClientUpdate]:
    """labels: each update reports label counts, skewed so most lack some labels; the last label is
    reported by nobody (its head row must keep its value)."""
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        slots_held = int(rng.integers(1, space.experts + 1))
        layers = space.layers[-int(rng.integers(1, len(space.layers) + 1)):]
        shapes = space.tier_shapes(layers, slots_held)
        samples = int(rng.integers(1, 500))
        counts = None
        if labels:
            counts = np.zeros(space.head_rows)
            counts[:-1] = rng.multinomial(samples, rng.dirichlet([0.2] * (space.head_rows - 1)))
        updates.append(ClientUpdate(
            device_id=f"d{i}", params={n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()},
            slot_map={layer: [int(g) for g in rng.permutation(space.experts)[:slots_held]] for layer in layers},
            num_samples=samples,
            expert_tokens={layer: rng.integers(0, 1000, slots_held).astype(np.float64) for layer in layers},
            label_counts=counts))
    return updates


def _batch_average(space, start, updates, weighting, dtype=np.float32):
    """The merge rule written directly over all updates at once (float64), rounded to `dtype`."""
    out = {}
    for p in space.entries:
        num, den = np.zeros(p.shape), np.zeros(p.shape[0])
        for u in updates:
            if p.layer is None:  # head row y: samples, or the update's samples of label y
                w = np.full(p.shape[0], u.num_samples) if u.label_counts is None else u.label_counts
                num += w.reshape(-1, *([1] * (len(p.shape) - 1))) * u.params[p.name].astype(np.float64)
                den += w
            elif p.layer in u.slot_map:
                for i, g in enumerate(u.slot_map[p.layer]):
                    w = u.num_samples if weighting == "samples" else u.expert_tokens[p.layer][i]
                    num[g] += w * u.params[p.name][i].astype(np.float64)
                    den[g] += w
        held = den > 0
        avg = start[p.name].astype(np.float64)
        avg[held] = num[held] / den[held].reshape(-1, *([1] * (len(p.shape) - 1)))
        out[p.name] = avg.astype(dtype)
    return out


@pytest.mark.parametrize("weighting,labels", [("samples", False), ("activation", False), ("samples", True)])
def test_streaming_equals_batch_any_order_and_same_order_is_bit_identical(weighting, labels):
    space = builtin_space(hidden=6, rank=3, experts=5, layers=3, classes=4)
    rng = np.random.default_rng(7)
    start = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in space.entries}
    updates = _random_updates(space, 9, seed=1, labels=labels)
    cfg = AggregationConfig(weighting=weighting)
    forward, _ = run(space, cfg, updates, start)
    expected = _batch_average(space, start, updates, weighting)
    shuffled, _ = run(space, cfg, [updates[i] for i in rng.permutation(len(updates))], start)
    again, _ = run(space, cfg, updates, start)
    for name in forward:
        np.testing.assert_allclose(forward[name], expected[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(shuffled[name], forward[name], rtol=1e-6, atol=1e-7)
        assert forward[name].tobytes() == again[name].tobytes()


@pytest.mark.parametrize("weighting", ["samples", "activation"])
def test_more_distinct_slot_maps_than_kept_plans_changes_nothing(weighting, monkeypatch):
    """Fold plans and the per-plan tallies are bounded caches: a round with more distinct slot maps than
    they keep (here 3) gives the batch average and the same expert usage as if nothing were evicted."""
    space = builtin_space(hidden=6, rank=3, experts=5, layers=3, classes=3)
    rng = np.random.default_rng(3)
    start = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in space.entries}
    updates = _random_updates(space, 40, seed=5)
    assert len({tuple((k, tuple(v)) for k, v in u.slot_map.items()) for u in updates}) > 20
    cfg = AggregationConfig(weighting=weighting)
    roomy, roomy_stats = run(space, cfg, updates, start)
    monkeypatch.setattr(fold_plan, "MAX_PLANS", 3)
    monkeypatch.setattr(aggregation, "MAX_PLANS", 3)
    tight, tight_stats = run(space, cfg, updates, start)
    expected = _batch_average(space, start, updates, weighting)
    for name in expected:
        np.testing.assert_allclose(tight[name], expected[name], rtol=1e-6, atol=1e-7)
        assert tight[name].tobytes() == roomy[name].tobytes()
    for layer in space.layers:
        routed = np.zeros(space.experts)
        for u in updates:
            if layer in u.slot_map:
                routed[u.slot_map[layer]] += u.expert_tokens[layer]
        np.testing.assert_allclose(tight_stats.usage_share[layer], routed / routed.sum(), rtol=1e-12)
        np.testing.assert_array_equal(tight_stats.usage_share[layer], roomy_stats.usage_share[layer])
    assert tight_stats.held_experts == roomy_stats.held_experts


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [6, 7, 0, 1], [3, 2, 1, 0], [1, 3, 5, 7], [5, 1, 3], [4],
                                   [7, 0, 1, 2, 3, 4, 5, 6], [2, 6, 0, 4, 1]])
def test_slot_runs_cover_the_slot_map_in_order(slots):
    runs = slot_runs(slots)
    assert [lo for lo, _, _, _ in runs] == [0] + [hi for _, hi, _, _ in runs[:-1]] and runs[-1][1] == len(slots)
    for lo, hi, g0, step in runs:
        assert [g0 + step * i for i in range(hi - lo)] == slots[lo:hi]
    assert len(runs) <= max(1, (len(slots) + 1) // 2)
    assert len(slot_runs([0, 1, 2, 3])) == 1 and len(slot_runs([6, 7, 0, 1])) == 2


def _realistic_updates(space: ParamSpace, start, count: int, seed: int) -> list[ClientUpdate]:
    """Trained weights = the global slots + a local step ~N(0, 0.002); samples 10..500; random slot maps."""
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        held = int(rng.integers(1, space.experts + 1))
        layers = space.layers[-int(rng.integers(1, len(space.layers) + 1)):]
        slot_map = {layer: [int(g) for g in rng.permutation(space.experts)[:held]] for layer in layers}
        given = space.gather_slots(start, slot_map)
        params = {n: (g + 0.002 * rng.standard_normal(g.shape)).astype(np.float32) for n, g in given.items()}
        updates.append(ClientUpdate(device_id=f"d{i}", params=params, slot_map=slot_map,
                                    num_samples=int(rng.integers(10, 501)),
                                    expert_tokens={layer: rng.integers(0, 1000, held).astype(np.float64)
                                                   for layer in layers}))
    return updates


@pytest.mark.parametrize("weighting", ["samples", "activation"])
def test_float32_sums_stay_within_2e_7_of_exact_over_many_clients_and_repeat_bit_for_bit(weighting):
    space = builtin_space(hidden=8, rank=2, experts=6, layers=2, classes=3)
    rng = np.random.default_rng(3)
    start = {p.name: (0.02 * rng.standard_normal(p.shape)).astype(np.float32) for p in space.entries}
    updates = _realistic_updates(space, start, 3 * SPILL_EVERY + 5, seed=4)  # the top layer spills 3 times
    cfg = AggregationConfig(weighting=weighting)
    new, _ = run(space, cfg, updates, start)
    again, _ = run(space, cfg, updates, start)
    exact = _batch_average(space, start, updates, weighting, dtype=np.float64)
    for name in new:
        err = np.linalg.norm(new[name] - exact[name]) / np.linalg.norm(exact[name])
        assert err < 2e-7, (name, err)  # rounding the output to float32 alone costs up to 6e-8
        assert new[name].tobytes() == again[name].tobytes()


def test_fold_keeps_no_reference_to_updates():
    space = tiny_space()
    update = client(space, **A)
    strategy = FftMoeStrategy(space)
    strategy.begin_round(global_arrays(space))
    strategy.fold(update)
    for arr in update.params.values():
        arr[...] = 1e6  # a device buffer reused after the fold must not change the round
    new, _ = strategy.finish()
    assert_row(new[W1], 0, 1.0)


def test_lifecycle_and_config_errors():
    space = tiny_space()
    strategy = FftMoeStrategy(space)
    with pytest.raises(RuntimeError):
        strategy.fold(client(space, **A))
    with pytest.raises(ValueError, match="do not match"):
        strategy.begin_round({W1: np.zeros((4, 2, 1), np.float32)})
    start = global_arrays(space)
    strategy.begin_round(start)
    good = client(space, **A)
    for broken in (_with(good, params=_params(good, PREFIX + "router", None)), _with(good, slot_map={3: [0, 1]}),
                   _with(good, expert_tokens={0: np.ones(3)})):
        with pytest.raises(ValueError, match="does not fit|disagree"):
            strategy.fold(broken)  # refused before any sum changed
    new, stats = strategy.finish()  # nobody (valid) reported: everything keeps its value
    assert stats.clients == 0 and all(np.array_equal(new[n], start[n]) for n in start)
    for bad in (dict(weighting="tokens"), dict(optimizer="sgd"), dict(beta2=1.0), dict(usage_decay=1.0),
                dict(clip_bound=0.0)):
        with pytest.raises(ValueError, match="aggregation config"):
            AggregationConfig(**bad)


def test_bench_aggregate_json():
    exe = shutil.which("fftmoe", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "fftmoe.cli"]
    done = subprocess.run(cmd + ["bench", "aggregate", "--clients", "3", "5", "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "aggregate"
    assert [r["clients"] for r in result["records"]] == [3, 5]
    for record in result["records"]:
        assert record["merge_gbps"] > 0 and record["memcpy_gbps"] > 0 and record["peak_rss_mb"] > 10
        assert record["floor_gbps"] > 0 and record["floor_ratio"] > 0 and record["finish_ms"] >= 0
    assert set(result["targets"]) >= {"merge_target_met", "peak_rss_spread_mb"}
