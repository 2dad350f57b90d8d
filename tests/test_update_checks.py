"""`validate_update` (broker_server/update_checks.py): each problem an update can have is reported, with its
reason, before it reaches a strategy."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.update_checks import validate_update
from tests.test_aggregation import B1, W1, _good, _params, _with

NAN_W1 = np.full((2, 2, 1), np.nan, np.float32)
INF_W1 = np.array([[[1.0], [np.inf]], [[0.0], [0.0]]], np.float32)

BAD_UPDATES = {
    "missing array": lambda u: _with(u, params=_params(u, W1, None)),
    "unexpected array": lambda u: _with(u, params=_params(u, "fftmoe_extra", np.zeros(2, np.float32))),
    "shape": lambda u: _with(u, params=_params(u, B1, np.zeros((3, 1), np.float32))),
    "dtype float64": lambda u: _with(u, params=_params(u, W1, np.zeros((2, 2, 1), np.float64))),
    "dtype int32": lambda u: _with(u, params=_params(u, W1, np.zeros((2, 2, 1), np.int32))),
    "NaN or Inf": lambda u: _with(u, params=_params(u, W1, NAN_W1)),
    "NaN or Inf ": lambda u: _with(u, params=_params(u, W1, INF_W1)),
    "num_samples": lambda u: _with(u, num_samples=0),
    "num_samples ": lambda u: _with(u, num_samples=-3),
    "num_samples  ": lambda u: _with(u, num_samples=2.5),
    "num_samples   ": lambda u: _with(u, num_samples=True),
    "entries, expected": lambda u: _with(u, slot_map={0: [0, 1, 2]}),
    "duplicates": lambda u: _with(u, slot_map={0: [1, 1]}),
    "integers in [0, 4)": lambda u: _with(u, slot_map={0: [0, 4]}),
    "integers in [0, 4) ": lambda u: _with(u, slot_map={0: [0, -1]}),
    "slot_map layers": lambda u: _with(u, slot_map={0: [0, 1], 5: [2, 3]}),
    "expert_tokens layers": lambda u: _with(u, expert_tokens={}),
    "expected (2,) numbers": lambda u: _with(u, expert_tokens={0: np.array([1.0, 2.0, 3.0])}),
    "finite and >= 0": lambda u: _with(u, expert_tokens={0: np.array([1.0, -1.0])}),
    "device_id": lambda u: _with(u, device_id=""),
    "one count per head row": lambda u: _with(u, label_counts=np.array([1.0])),
    "integers >= 0": lambda u: _with(u, label_counts=np.array([2.0, -1.0])),
    "integers >= 0 ": lambda u: _with(u, label_counts=np.array([0.5, 0.5])),
    "not num_samples": lambda u: _with(u, label_counts=np.array([1.0, 1.0])),
}


@pytest.mark.parametrize("problem", list(BAD_UPDATES))
def test_validation_detects_each_problem(problem):
    space, good, expected = _good()
    assert validate_update(good, expected, space.experts) == []
    problems = validate_update(BAD_UPDATES[problem](good), expected, space.experts)
    assert len(problems) == 1 and problem.strip() in problems[0], problems


def test_label_counts_summing_to_the_samples_are_valid():
    space, good, expected = _good()
    assert validate_update(_with(good, label_counts=np.array([0.0, 1.0])), expected, space.experts) == []


def test_huge_but_finite_values_are_not_called_nan_or_inf():
    """The finiteness check's fast path (a dot product) overflows for |x| > ~1.8e19; it must not
    turn that into a rejection, nor miss -Inf next to it."""
    space, good, expected = _good()
    huge = np.array([[[3e38], [-1e30]], [[0.0], [1.0]]], np.float32)
    assert validate_update(_with(good, params=_params(good, W1, huge)), expected, space.experts) == []
    huge[1, 0, 0] = -np.inf
    problems = validate_update(_with(good, params=_params(good, W1, huge)), expected, space.experts)
    assert len(problems) == 1 and "NaN or Inf" in problems[0]
