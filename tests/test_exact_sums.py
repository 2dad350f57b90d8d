"""Exact (integer fixed-point) aggregation: hand-computed merges, any order and any split between
workers give the same bits, precision against float64, and updates outside the exact range are
rejected without a trace. Tiny parameter spaces built here; no broker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from broker_server.aggregation import AggregationConfig, FftMoeStrategy, UpdateRejected
from broker_server.bench_aggregate import builtin_space
from tests.test_aggregation import (HEAD_B, HEAD_W, PREFIX, A, B, _batch_average, _random_updates, assert_row,
                                    client, expert_rows, global_arrays, run, tiny_space)

EXACT = AggregationConfig(exact=True)


def test_hand_computed_overlapping_clients_match_exactly():
    space = tiny_space()
    start = global_arrays(space)
    new, stats = run(space, EXACT, [client(space, **A), client(space, **B)], start)
    for suffix, arr in expert_rows(new, space).items():
        assert_row(arr, 0, 1.0)
        assert_row(arr, 1, 5.0)  # (1 * 2 + 3 * 6) / 4, exact on the 2^-24 grid
        assert_row(arr, 2, 4.0)
        np.testing.assert_array_equal(arr[3], start[PREFIX + suffix][3])  # nobody held it
    np.testing.assert_array_equal(new[HEAD_W], np.full((2, 2), 4.0, np.float32))
    np.testing.assert_array_equal(new[HEAD_B], np.full((2,), 4.0, np.float32))
    assert (stats.clients, stats.samples, stats.held_experts) == (2, 4, {0: 3})


def _bits(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in arrays.items()}


@pytest.mark.parametrize("weighting,labels", [("samples", False), ("activation", False), ("samples", True)])
def test_any_order_and_any_split_between_workers_is_bit_identical(weighting, labels):
    space = builtin_space(hidden=6, rank=3, experts=5, layers=3, classes=4)
    rng = np.random.default_rng(3)
    start = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in space.entries}
    updates = _random_updates(space, 12, seed=2, labels=labels)
    cfg = AggregationConfig(weighting=weighting, exact=True, clip_bound=30.0)  # some updates get clipped
    single, single_stats = run(space, cfg, updates, start)
    shuffled, _ = run(space, cfg, [updates[i] for i in rng.permutation(len(updates))], start)
    assert _bits(shuffled) == _bits(single)
    # three workers fold a random share each, in their own order; a coordinator merges their partials
    owner = rng.integers(0, 3, len(updates))
    workers = [FftMoeStrategy(space, cfg) for _ in range(3)]
    for k, worker in enumerate(workers):
        worker.begin_round(start)
        for i in rng.permutation(np.flatnonzero(owner == k)):
            worker.fold(updates[i])
    coordinator = FftMoeStrategy(space, cfg)
    coordinator.begin_round(start)
    for k in rng.permutation(3):
        coordinator.merge(workers[k].partial())
    merged, merged_stats = coordinator.finish()
    assert _bits(merged) == _bits(single)
    assert (merged_stats.clients, merged_stats.samples, merged_stats.clipped) == \
           (single_stats.clients, single_stats.samples, single_stats.clipped) and single_stats.clipped > 0
    assert all(np.array_equal(merged_stats.usage_share[k], single_stats.usage_share[k]) for k in space.layers)
    # and the float32 default is close to it (it is the same rule, rounded differently)
    default, _ = run(space, AggregationConfig(weighting=weighting, clip_bound=30.0), updates, start)
    for name in single:
        np.testing.assert_allclose(single[name], default[name], rtol=1e-6, atol=1e-7)


def test_a_partial_with_one_head_weight_counts_it_for_every_row():
    """A 1.2 worker reports one head weight; merged, it weighs every head row, as folding there would."""
    space = builtin_space(hidden=4, rank=2, experts=3, layers=1, classes=3)
    start = {p.name: np.zeros(p.shape, np.float32) for p in space.entries}
    [update] = _random_updates(space, 1, seed=4)
    cfg = AggregationConfig(exact=True)
    single, _ = run(space, cfg, [update], start)
    worker = FftMoeStrategy(space, cfg)
    worker.begin_round(start)
    worker.fold(update)
    part = worker.partial()
    assert part.head_den == [float(update.num_samples)] * 3
    coordinator = FftMoeStrategy(space, cfg)
    coordinator.begin_round(start)
    coordinator.merge(dataclasses.replace(part, head_den=[float(update.num_samples)]))
    assert _bits(coordinator.finish()[0]) == _bits(single)
    coordinator.begin_round(start)
    with pytest.raises(ValueError, match="2 head rows; the head has 3"):
        coordinator.merge(dataclasses.replace(part, head_den=[1.0, 2.0]))


def test_error_against_a_float64_sum_is_below_3e8():
    space = builtin_space(hidden=8, rank=4, experts=4, layers=2, classes=3)
    rng = np.random.default_rng(5)
    start = {p.name: (rng.standard_normal(p.shape) * 0.02).astype(np.float32) for p in space.entries}
    updates = _random_updates(space, 40, seed=6)
    for u in updates:  # values of a trained adapter: global +- a small step
        for name, x in u.params.items():
            x *= 0.02
    exact, _ = run(space, EXACT, updates, start)
    reference = _batch_average(space, start, updates, "samples", dtype=np.float64)
    worst = max(float(np.max(np.abs(exact[n].astype(np.float64) - reference[n]))) for n in exact)
    assert worst < 3e-8 + 2e-9  # the grid's bound plus float32 output rounding at |x| < 0.1


def test_values_outside_the_exact_range_are_rejected_without_a_trace():
    space = tiny_space()
    start = global_arrays(space)
    strategy = FftMoeStrategy(space, EXACT)
    strategy.begin_round(start)
    strategy.fold(client(space, **A))
    huge = client(space, slots=[2, 3], row_values=[1.0, 300.0], head_value=1.0, samples=2, device="huge")
    with pytest.raises(UpdateRejected, match="values reach 300.*exact aggregation holds"):
        strategy.fold(huge)
    fractional = client(space, slots=[2, 3], row_values=[1.0, 1.0], head_value=1.0, samples=2,
                        tokens=[1.5, 2.0], device="frac")
    by_tokens = FftMoeStrategy(space, AggregationConfig(exact=True, weighting="activation"))
    by_tokens.begin_round(start)
    with pytest.raises(UpdateRejected, match="routed tokens 1.5: exact aggregation needs integer weights"):
        by_tokens.fold(fractional)
    too_many = client(space, slots=[2, 3], row_values=[1.0, 1.0], head_value=1.0, samples=1 << 21)
    with pytest.raises(UpdateRejected, match="num_samples 2097152"):
        strategy.fold(too_many)
    strategy.fold(client(space, **B))
    new, stats = strategy.finish()
    clean, _ = run(space, EXACT, [client(space, **A), client(space, **B)], start)
    assert _bits(new) == _bits(clean) and stats.clients == 2


def test_round_weight_past_the_exact_range_is_refused():
    space = tiny_space()
    strategy = FftMoeStrategy(space, EXACT)
    strategy.begin_round(global_arrays(space))
    big = dict(slots=[0, 1], row_values=[1.0, 1.0], head_value=1.0, samples=(1 << 21) - 1)
    for _ in range(1024):  # 1024 x (2^21 - 1) < 2^31
        strategy.fold(client(space, **big))
    with pytest.raises(UpdateRejected, match="past the exact accumulator's range"):
        strategy.fold(client(space, **big))
    _, stats = strategy.finish()
    assert stats.clients == 1024


def test_merge_refuses_partials_of_another_shape_and_the_float_mode():
    space = tiny_space()
    other = tiny_space(layers=2)
    mine, theirs = FftMoeStrategy(space, EXACT), FftMoeStrategy(other, EXACT)
    mine.begin_round(global_arrays(space))
    theirs.begin_round(global_arrays(other))
    with pytest.raises(ValueError, match="other layers or experts"):
        mine.merge(theirs.partial())
    plain = FftMoeStrategy(space, AggregationConfig())
    plain.begin_round(global_arrays(space))
    with pytest.raises(RuntimeError, match="exact=True"):
        plain.partial()
