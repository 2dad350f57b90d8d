"""LoRA baseline aggregation (FedIT, HetLoRA, FlexLoRA) on tiny spaces with hand-computed arrays.

Hand-computed cases use small integers and weights 1 and 3 (total 4), so every expected average is exact in
binary floating point and compared with array_equal. FlexLoRA's SVD views are compared with numpy's own
truncated SVD and with the Eckart-Young error at float64 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import RoundStats, Strategy
from broker_server.lora_strategies import (FedItStrategy, FlexLoraStrategy, HetLoraStrategy, LoraSpace,
                                           LoraUpdate)

HEAD = "fftmoe_head.weight"
W = "encoder.layer.0.intermediate.dense"  # base name of the one adapted weight
A, B, BA = W + ".fftmoe_lora_A", W + ".fftmoe_lora_B", W + ".fftmoe_lora_BA"


def update(device: str, samples: int, rank: int, a, b, head) -> LoraUpdate:
    return LoraUpdate(device, {A: np.array(a, dtype=np.float64), B: np.array(b, dtype=np.float64),
                               HEAD: np.array(head, dtype=np.float64)}, samples, rank)


def run_round(strategy: Strategy, global_arrays, updates):
    strategy.begin_round(global_arrays)
    for u in updates:
        strategy.fold(u)
    return strategy.finish()


def random_updates(rng, space: LoraSpace, ranks, dtype=np.float64):
    """One update per rank with random factors and head, sample counts 1..50."""
    out = []
    for i, r in enumerate(ranks):
        shapes = space.factor_shapes(r)
        out.append(LoraUpdate(f"dev{i}", {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()},
                              int(rng.integers(1, 51)), r))
    return out


# -- FedIT ----------------------------------------------------------------------------------------
def test_fedit_weighted_fedavg_of_a_b_and_head():
    space = LoraSpace({W: (2, 3)}, {HEAD: (2, 2)})
    strategy = FedItStrategy(space, rank=1)
    zeros = {A: np.zeros((1, 3)), B: np.zeros((2, 1)), HEAD: np.zeros((2, 2))}
    new, stats = run_round(strategy, zeros, [
        update("a", 1, 1, [[1, 2, 3]], [[1], [2]], np.ones((2, 2))),
        update("b", 3, 1, [[5, 6, 7]], [[3], [6]], 3 * np.ones((2, 2)))])
    np.testing.assert_array_equal(new[A], [[4, 5, 6]])  # (1*[1,2,3] + 3*[5,6,7]) / 4
    np.testing.assert_array_equal(new[B], [[2.5], [5]])  # (1*[1,2] + 3*[3,6]) / 4
    np.testing.assert_array_equal(new[HEAD], np.full((2, 2), 2.5))  # (1 + 9) / 4
    assert isinstance(stats, RoundStats)
    assert (stats.round, stats.clients, stats.samples, stats.bytes_folded) == (0, 2, 4, 2 * (3 + 2 + 4) * 8)
    expected_norm = np.sqrt(np.sum(np.square([4, 5, 6, 2.5, 5])) + 4 * 2.5 ** 2)
    assert stats.pseudo_grad_norm == pytest.approx(expected_norm)
    # FedIT's view is the whole global, unchanged
    view = strategy.client_view(new, 1)
    assert set(view) == {A, B, HEAD} and all(np.array_equal(view[n], new[n]) for n in view)


def test_label_counts_weigh_each_head_row_and_a_row_nobody_has_keeps_its_value():
    space = LoraSpace({W: (2, 3)}, {HEAD: (3, 2)})
    start = {A: np.zeros((1, 3)), B: np.zeros((2, 1)), HEAD: np.full((3, 2), 7.0)}
    a = update("a", 1, 1, [[1, 2, 3]], [[1], [2]], np.ones((3, 2)))
    b = update("b", 3, 1, [[5, 6, 7]], [[3], [6]], 3 * np.ones((3, 2)))
    a, b = (LoraUpdate(u.device_id, u.params, u.num_samples, u.rank, np.array(c, dtype=np.float64))
            for u, c in ((a, [1, 0, 0]), (b, [1, 2, 0])))
    new, _ = run_round(FedItStrategy(space, rank=1), start, [a, b])
    np.testing.assert_array_equal(new[HEAD], [[2, 2], [3, 3], [7, 7]])  # (1 + 3) / 2; b alone; nobody
    np.testing.assert_array_equal(new[A], [[4, 5, 6]])  # the factors keep the samples rule
    bad = LoraUpdate("c", a.params, 1, 1, np.array([1.0, 1.0, 0.0]))
    assert FedItStrategy(space, rank=1).problems(bad) == ["label_counts sum to 2, not num_samples 1"]


def test_fedit_refuses_a_client_at_another_rank():
    space = LoraSpace({W: (4, 4)}, {})
    strategy = FedItStrategy(space, rank=2)
    strategy.begin_round({A: np.zeros((2, 4)), B: np.zeros((4, 2))})
    with pytest.raises(ValueError, match="FedIT runs every client at rank 2"):
        strategy.fold(LoraUpdate("x", {A: np.zeros((1, 4)), B: np.zeros((4, 1))}, 5, 1))


# -- HetLoRA --------------------------------------------------------------------------------------
HET_SPACE = LoraSpace({W: (4, 4)}, {HEAD: (1, 2)})
A_LOW = [[1, 1, 1, 1], [2, 2, 2, 2]]  # rank 2, 1 sample
B_LOW = [[1, 2]] * 4
A_HIGH = [[4] * 4, [8] * 4, [12] * 4, [16] * 4]  # rank 4, 3 samples
B_HIGH = [[4, 8, 12, 16]] * 4


def het_zeros():
    return {A: np.zeros((4, 4)), B: np.zeros((4, 4)), HEAD: np.zeros((1, 2))}


def test_hetlora_zero_pads_to_r_max_and_averages():
    strategy = HetLoraStrategy(HET_SPACE, r_max=4)
    new, _ = run_round(strategy, het_zeros(), [update("low", 1, 2, A_LOW, B_LOW, [[1, 1]]),
                                              update("high", 3, 4, A_HIGH, B_HIGH, [[5, 5]])])
    # row i of A: (1 * low_i + 3 * high_i) / 4 with low padded by zero rows: [13/4, 26/4, 36/4, 48/4]
    np.testing.assert_array_equal(new[A], [[3.25] * 4, [6.5] * 4, [9] * 4, [12] * 4])
    np.testing.assert_array_equal(new[B], [[3.25, 6.5, 9, 12]] * 4)  # the same, on B's columns
    np.testing.assert_array_equal(new[HEAD], [[4, 4]])


def test_hetlora_view_is_the_top_rank_slice():
    strategy = HetLoraStrategy(HET_SPACE, r_max=4)
    new, _ = run_round(strategy, het_zeros(), [update("low", 1, 2, A_LOW, B_LOW, [[1, 1]]),
                                              update("high", 3, 4, A_HIGH, B_HIGH, [[5, 5]])])
    view = strategy.client_view(new, 2)
    np.testing.assert_array_equal(view[A], [[3.25] * 4, [6.5] * 4])
    np.testing.assert_array_equal(view[B], [[3.25, 6.5]] * 4)
    np.testing.assert_array_equal(view[HEAD], [[4, 4]])
    full = strategy.client_view(new, 4)
    assert np.array_equal(full[A], new[A]) and np.array_equal(full[B], new[B])
    view[A][0, 0] = -1  # a view is a copy: editing it leaves the global alone
    assert new[A][0, 0] == 3.25
    with pytest.raises(ValueError, match=r"rank 5 outside \[1, r_max=4\]"):
        strategy.client_view(new, 5)


def test_hetlora_round_without_a_full_rank_client_zeroes_the_top_rows():
    """Documented behaviour of the plain zero-pad average: components no client of the round holds -> 0."""
    strategy = HetLoraStrategy(HET_SPACE, r_max=4)
    new, _ = run_round(strategy, {A: np.ones((4, 4)), B: np.ones((4, 4)), HEAD: np.zeros((1, 2))},
                       [update("low", 1, 2, A_LOW, B_LOW, [[1, 1]])])
    np.testing.assert_array_equal(new[A], [[1] * 4, [2] * 4, [0] * 4, [0] * 4])


# -- FlexLoRA -------------------------------------------------------------------------------------
def test_flexlora_hand_computed_product_and_rank1_view():
    space = LoraSpace({W: (2, 2)}, {HEAD: (1, 1)})
    strategy = FlexLoraStrategy(space, r_max=2)
    new, _ = run_round(strategy, {BA: np.zeros((2, 2)), HEAD: np.zeros((1, 1))}, [
        update("r1", 1, 1, [[2, 0]], [[1], [0]], [[1]]),  # B A = [[2, 0], [0, 0]]
        update("r2", 3, 2, [[0, 0], [0, 4]], [[1, 0], [0, 1]], [[1]])])  # B A = [[0, 0], [0, 4]]
    np.testing.assert_array_equal(new[BA], [[0.5, 0], [0, 3]])  # (1 * 2, 3 * 4) / 4 on the diagonal
    assert set(new) == {BA, HEAD}
    view = strategy.client_view(new, 1)  # singular values 3 and 0.5: keep 3 on e2 e2^T, split as sqrt(3)^2
    np.testing.assert_allclose(np.abs(view[B]), [[0], [np.sqrt(3)]], atol=1e-15)
    np.testing.assert_allclose(np.abs(view[A]), [[0, np.sqrt(3)]], atol=1e-15)
    np.testing.assert_allclose(view[B] @ view[A], [[0, 0], [0, 3]], atol=1e-15)
    np.testing.assert_allclose(strategy.client_view(new, 2)[B] @ strategy.client_view(new, 2)[A], new[BA],
                               atol=1e-15)


FLEX_SPACE = LoraSpace({W: (6, 5), "encoder.layer.1.output.dense": (5, 7)}, {HEAD: (3, 5)})


def test_flexlora_product_is_weighted_average_and_views_are_best_rank_r():
    rng = np.random.default_rng(0)
    strategy = FlexLoraStrategy(FLEX_SPACE, r_max=4)
    updates = random_updates(rng, FLEX_SPACE, [1, 2, 4, 3])
    new, _ = run_round(strategy, {n: np.zeros(s) for n, s in strategy.global_shapes().items()}, updates)
    weights = np.array([u.num_samples for u in updates], dtype=np.float64)
    for base in FLEX_SPACE.adapted:
        products = [u.params[base + ".fftmoe_lora_B"] @ u.params[base + ".fftmoe_lora_A"] for u in updates]  # [d_out, d_in]
        expected = np.tensordot(weights, products, axes=1) / weights.sum()
        np.testing.assert_allclose(new[base + ".fftmoe_lora_BA"], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new[HEAD], np.tensordot(weights, [u.params[HEAD] for u in updates], axes=1)
                               / weights.sum(), rtol=1e-12)

    views = strategy.client_views(new, [1, 2, 3, 4])
    for r, view in views.items():
        assert np.array_equal(view[HEAD], new[HEAD])
        for base, (d_out, d_in) in FLEX_SPACE.adapted.items():
            b, a, product = view[base + ".fftmoe_lora_B"], view[base + ".fftmoe_lora_A"], new[base + ".fftmoe_lora_BA"]
            assert b.shape == (d_out, r) and a.shape == (r, d_in)
            u, s, vt = np.linalg.svd(product)
            truncated = (u[:, :r] * s[:r]) @ vt[:r]  # numpy's best rank-r approximation
            np.testing.assert_allclose(b @ a, truncated, atol=1e-12)
            error = np.linalg.norm(product - b @ a)  # Eckart-Young: the discarded singular values
            assert error == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-9, abs=1e-12)
            assert error > 1e-3  # the sum of four random updates has full rank 5 > 4: something is discarded
            # balanced split B = U sqrt(S), A = sqrt(S) V^T: B^T B = A A^T = diag(S_r)
            np.testing.assert_allclose(b.T @ b, np.diag(s[:r]), atol=1e-12)
            np.testing.assert_allclose(a @ a.T, np.diag(s[:r]), atol=1e-12)
    single = strategy.client_view(new, 3)
    assert all(np.allclose(single[n], views[3][n], atol=1e-12) for n in single)


def test_flexlora_rank_at_least_the_product_rank_reconstructs_exactly():
    rng = np.random.default_rng(1)
    strategy = FlexLoraStrategy(FLEX_SPACE, r_max=4)
    updates = random_updates(rng, FLEX_SPACE, [1, 1])  # each product rank 1: the average has rank <= 2
    new, _ = run_round(strategy, {n: np.zeros(s) for n, s in strategy.global_shapes().items()}, updates)
    for r in (2, 3, 4):
        view = strategy.client_view(new, r)
        for base in FLEX_SPACE.adapted:
            np.testing.assert_allclose(view[base + ".fftmoe_lora_B"] @ view[base + ".fftmoe_lora_A"], new[base + ".fftmoe_lora_BA"],
                                       atol=1e-12)
    one = strategy.client_view(new, 1)  # and rank 1 cannot
    assert not np.allclose(one[B] @ one[A], new[BA], atol=1e-6)


def test_float32_global_stays_float32():
    strategy = FlexLoraStrategy(FLEX_SPACE, r_max=2)
    shapes = strategy.global_shapes()
    new, _ = run_round(strategy, {n: np.zeros(s, np.float32) for n, s in shapes.items()},
                       random_updates(np.random.default_rng(2), FLEX_SPACE, [2, 1], np.float32))
    assert all(a.dtype == np.float32 for a in new.values())
    assert all(a.dtype == np.float32 for a in strategy.client_view(new, 2).values())


# -- streaming ------------------------------------------------------------------------------------
STRATEGIES = {"fedit": lambda: (FedItStrategy(FLEX_SPACE, 3), [3, 3, 3, 3, 3]),
              "hetlora": lambda: (HetLoraStrategy(FLEX_SPACE, 4), [1, 4, 2, 4, 3]),
              "flexlora": lambda: (FlexLoraStrategy(FLEX_SPACE, 4), [1, 4, 2, 4, 3])}


@pytest.mark.parametrize("method", sorted(STRATEGIES))
@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(5)))
def test_fold_order_does_not_matter(method, order):
    strategy, ranks = STRATEGIES[method]()
    updates = random_updates(np.random.default_rng(3), FLEX_SPACE, ranks)
    start = {n: np.full(s, 0.5) for n, s in strategy.global_shapes().items()}
    reference, _ = run_round(strategy, start, updates)
    shuffled, stats = run_round(strategy, start, [updates[i] for i in order])
    assert stats.round == 1 and stats.clients == 5
    for name in reference:
        np.testing.assert_allclose(shuffled[name], reference[name], rtol=1e-13, atol=1e-15)
        assert not np.array_equal(reference[name], start[name])  # the round did move every array


def test_round_without_updates_keeps_the_global():
    strategy = HetLoraStrategy(HET_SPACE, 4)
    start = {n: np.full(s, 7.0) for n, s in strategy.global_shapes().items()}
    new, stats = run_round(strategy, start, [])
    assert all(np.array_equal(new[n], start[n]) for n in start)
    assert (stats.clients, stats.samples, stats.pseudo_grad_norm) == (0, 0, 0.0)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda p, u: dict(u, rank=5), r"rank 5 outside \[1, r_max=4\]"),
    (lambda p, u: dict(u, rank=0), r"rank 0 outside"),
    (lambda p, u: dict(u, params={**p, A: np.zeros((3, 4))}), r"lora_A': shape \(3, 4\), expected \(2, 4\) at rank 2"),
    (lambda p, u: dict(u, params={**p, B: np.zeros((4, 3))}), r"lora_B': shape \(4, 3\), expected \(4, 2\)"),
    (lambda p, u: dict(u, params={k: v for k, v in p.items() if k != HEAD}), "missing array 'fftmoe_head.weight'"),
    (lambda p, u: dict(u, params={**p, "stray": np.zeros(1)}), "unexpected array 'stray'"),
    (lambda p, u: dict(u, params={**p, A: np.full((2, 4), np.nan)}), "NaN or Inf"),
    (lambda p, u: dict(u, params={**p, A: np.zeros((2, 4), np.int64)}), "expected a float array"),
    (lambda p, u: dict(u, num_samples=0), "num_samples must be a positive integer"),
    (lambda p, u: dict(u, rank=2.0), "rank must be an integer"),
])
def test_bad_updates_raise_and_leave_the_sums_alone(mutate, message):
    good = update("low", 1, 2, A_LOW, B_LOW, [[1, 1]])
    fields = dict(device_id="bad", params=good.params, num_samples=3, rank=2)
    bad = LoraUpdate(**mutate(good.params, fields))
    strategy = HetLoraStrategy(HET_SPACE, r_max=4)
    strategy.begin_round(het_zeros())
    with pytest.raises(ValueError, match=message) as err:
        strategy.fold(bad)
    assert "update from 'bad' rejected" in str(err.value)
    strategy.fold(good)
    new, stats = strategy.finish()
    assert stats.clients == 1
    np.testing.assert_array_equal(new[A], [[1] * 4, [2] * 4, [0] * 4, [0] * 4])


def test_misuse_raises_clear_errors():
    strategy = FlexLoraStrategy(FLEX_SPACE, r_max=4)
    with pytest.raises(RuntimeError, match="before begin_round"):
        strategy.fold(random_updates(np.random.default_rng(4), FLEX_SPACE, [1])[0])
    with pytest.raises(ValueError, match="wrong names or shapes"):  # factors given where products belong
        strategy.begin_round({n: np.zeros(s) for n, s in FLEX_SPACE.factor_shapes(4).items()})
    with pytest.raises(ValueError, match="r_max must be an integer in"):
        HetLoraStrategy(FLEX_SPACE, r_max=6)  # above min(d_out, d_in) = 5
    with pytest.raises(ValueError, match="head names starting"):
        LoraSpace({W: (2, 2)}, {"classifier.weight": (2, 2)})


def test_space_from_factor_shapes():
    space, rank = LoraSpace.from_factor_shapes(FLEX_SPACE.factor_shapes(4))
    assert rank == 4 and dict(space.adapted) == dict(FLEX_SPACE.adapted) and dict(space.head) == dict(FLEX_SPACE.head)
    with pytest.raises(ValueError, match="neither a head array"):
        LoraSpace.from_factor_shapes({A: (2, 4)})  # no matching lora_B
    with pytest.raises(ValueError, match="disagree on the rank"):
        LoraSpace.from_factor_shapes({A: (2, 4), B: (4, 3)})
