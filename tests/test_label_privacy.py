"""The label counts a device reports: exact, or one differentially private release that sums to its
samples, is drawn once and survives restarts (edge_runtime.label_privacy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from broker_server.update_checks import label_count_problems
from edge_runtime.label_privacy import RELEASE_FILE, discrete_laplace, private_histogram, reported_counts, to_total
from edge_runtime.local_state import StateFileError


def test_to_total_keeps_proportions_and_hits_the_total_exactly():
    assert to_total(np.array([1.0, 1.0, 2.0]), 8).tolist() == [2, 2, 4]
    assert to_total(np.array([-3.0, 5.0, 5.0]), 5).tolist() in ([0, 3, 2], [0, 2, 3])  # negatives clip to 0
    assert to_total(np.array([0.0, 0.0, 0.0, 0.0]), 6).tolist() == [2, 2, 1, 1]  # nothing left: spread evenly
    got = to_total(np.array([0.3, 7.1, 2.6]), 101)
    assert got.sum() == 101 and got.min() >= 0 and got.dtype.kind == "i"


def test_discrete_laplace_has_the_promised_ratio_between_neighbouring_values():
    """P(k + 1) / P(k) = exp(-epsilon / 2) for k >= 0: the ratio that makes the release epsilon-DP when
    one changed label moves two counts by one each."""
    epsilon, draws = 1.0, 400_000
    noise = discrete_laplace(draws, epsilon, np.random.default_rng(0))
    alpha = math.exp(-epsilon / 2)
    p = {k: np.mean(noise == k) for k in (-1, 0, 1, 2)}
    assert p[0] == pytest.approx((1 - alpha) / (1 + alpha), rel=0.02)
    assert p[1] / p[0] == pytest.approx(alpha, rel=0.03) and p[2] / p[1] == pytest.approx(alpha, rel=0.04)
    assert p[-1] == pytest.approx(p[1], rel=0.03)  # symmetric
    assert noise.var() == pytest.approx(2 * alpha / (1 - alpha) ** 2, rel=0.03)


@pytest.mark.parametrize("epsilon", [0, -1, math.inf, math.nan])
def test_discrete_laplace_refuses_an_epsilon_that_is_not_positive_and_finite(epsilon):
    with pytest.raises(ValueError, match="epsilon must be a positive finite number"):
        discrete_laplace(3, epsilon, np.random.default_rng(0))


def test_a_private_release_passes_the_servers_check_and_moves_small_counts_more_at_small_epsilon():
    counts = np.array([120, 3, 0, 0, 77])
    rng = np.random.default_rng(1)
    strict = np.array([private_histogram(counts, 0.1, rng) for _ in range(200)])
    loose = np.array([private_histogram(counts, 8.0, rng) for _ in range(200)])
    for release in (*strict, *loose):
        assert label_count_problems(release, int(counts.sum()), len(counts)) == []
    assert np.abs(loose - counts).mean() < 0.5 < 5 < np.abs(strict - counts).mean()
    # clipping at zero lifts the empty labels a little, yet on average the big labels stay far ahead
    assert strict.mean(axis=0)[[0, 4]].min() > 5 * strict.mean(axis=0)[[1, 2, 3]].max()


def test_exact_counts_when_no_epsilon_and_nothing_written(tmp_path):
    assert reported_counts(np.array([4, 0, 6]), None, tmp_path) == [4, 0, 6]
    assert not (tmp_path / RELEASE_FILE).exists()


def test_one_release_is_drawn_saved_and_repeated_until_the_counts_or_epsilon_change(tmp_path):
    counts = [40, 1, 0, 9, 50]
    first = reported_counts(counts, 0.5, tmp_path)
    assert sum(first) == 100 and json.loads((tmp_path / RELEASE_FILE).read_text())["released"] == first
    assert all(reported_counts(counts, 0.5, tmp_path) == first for _ in range(20))  # never a fresh draw
    releases = {tuple(reported_counts(counts, eps, tmp_path)) for eps in np.linspace(0.05, 0.1, 20)}
    assert len(releases) > 1  # a new epsilon is a new release
    assert sum(reported_counts([5, 5, 0, 0, 0], 0.5, tmp_path)) == 10  # new data: a new release


def test_a_corrupt_release_file_is_an_error_naming_it_not_a_silent_redraw(tmp_path):
    (tmp_path / RELEASE_FILE).write_text("{not json")
    with pytest.raises(StateFileError, match=f"{RELEASE_FILE} is corrupt.*move it away"):
        reported_counts([1, 2], 1.0, tmp_path)
