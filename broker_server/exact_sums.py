"""Order-independent weighted sums for sharded aggregation: integer fixed point, exact addition.

`ExactSums` keeps sum_n w_n x_n per aggregated array (rows = global experts) and per head array,
like `accumulate.SlotSums`, but every term is rounded once, on its own, to a fixed grid and the
terms are added as int64 integers, which is exact. The total therefore does not depend on the
order updates arrive in or on how they are split between processes: partial sums from several
aggregator workers, added together, are bit for bit what one process folding every update computes
(`merge`). Float addition is not associative, which is why `SlotSums` cannot offer this.

Per element, for an update with integer weight w (samples, or tokens routed to the row's expert):

    t = rint(float64(x) * (w * 2^FRACTION_BITS))    exact product (x has a 24-bit significand, w < 2^21),
                                                    one rounding to an integer, |t| < 2^53
    acc = acc + int64(t)                            exact while sum |t| < 2^63
    total = float64(acc) / 2^FRACTION_BITS          (the caller divides by sum w)

Limits that make every step exact, checked before an update changes anything (`stage` raises
ValueError, the caller rejects the update): |x| < 2^VALUE_BITS, weights integers in [0, 2^21), and
the weights of one round summing to less than 2^31 per block (2^(63 - VALUE_BITS - FRACTION_BITS)).
Error: each term is off by at most half a grid step, 2^-25 w; the average over N updates by at most
2^-25 (3e-8) absolute, about a float32 ulp at 0.3 and 15 at 0.02, far below a round's change.
An update is folded in two steps: `add_layer` / `add_whole` compute its integer terms into per-update
scratch (O(update), not O(clients)) and `commit` adds them, so a rejected update leaves no trace.

Speed: per element a multiply into float64, a rounding cast to int64 and an int64 add, plus a
min/max read: about a quarter of `SlotSums`' saxpy rate. It serves sharded aggregation, where each
worker's time goes to receiving updates, not folding them; one process uses `SlotSums` by default.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from broker_server.accumulate import Run, slot_runs

FRACTION_BITS = 24  # grid step of x: 2^-24 (times the weight)
VALUE_BITS = 8  # |x| < 256; adapter weights and biases are O(1)
WEIGHT_LIMIT = 1 << 21  # weights are integers below this: t < 2^(8 + 24 + 21) = 2^53, exact in float64
SUM_LIMIT = 1 << (63 - VALUE_BITS - FRACTION_BITS)  # sum of one round's weights per block: no int64 overflow
_SCALE = float(1 << FRACTION_BITS)
_BOUND = float(1 << VALUE_BITS)


class ExactSums:
    """sum_n w_n x_n as int64 fixed point; the interface of `accumulate.SlotSums` plus `commit`,
    `discard`, `partial` and `merge`.

    layers: layer -> [(name, trailing shape)] in the order `add_layer` receives the arrays;
    whole: name -> shape of the arrays `add_whole` adds in full (the head)."""

    def __init__(self, experts: int, layers: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]],
                 whole: Mapping[str, tuple[int, ...]]):
        self.experts = experts
        self.layers = {layer: [(name, tuple(trail)) for name, trail in cols] for layer, cols in layers.items()}
        shapes = {name: (experts, *trail) for cols in self.layers.values() for name, trail in cols}
        shapes.update({name: tuple(shape) for name, shape in whole.items()})
        self.shapes = shapes
        self.acc = {name: np.zeros(shape, np.int64) for name, shape in shapes.items()}
        # per block (row, or the whole array) this round's weight sum, for the exact-range check
        self._weight_sum = {name: np.zeros(1 if name in whole else experts, np.int64) for name in shapes}
        self._w = 0
        self._wrows = np.zeros(experts, np.int64)
        self._staged: list[tuple] = []  # (name, rows or None for all, int64 terms, int64 weights)

    # -- the SlotSums interface the strategy folds through --------------------------------------------
    def reset(self) -> None:
        for name in self.acc:
            self.acc[name].fill(0)
            self._weight_sum[name].fill(0)
        self._staged.clear()

    def weight(self, w) -> float:
        """Set the update's weight (an integer in [0, 2^21)); returns it as a float."""
        self._w = _integer_weight(w, "num_samples")
        return float(self._w)

    def row_weights(self, w: np.ndarray) -> list[float]:
        """Per-row integer weights [M_t] for `add_layer(..., rows=True)` (routed tokens)."""
        values = [_integer_weight(v, "routed tokens") for v in np.asarray(w).tolist()]
        self._wrows[:len(values)] = values
        return [float(v) for v in values]

    def runs(self, slots: Sequence[int]) -> tuple[Run, ...] | None:
        key = tuple(slots)
        if not key or not all(isinstance(g, (int, np.integer)) and 0 <= g < self.experts for g in key):
            return None
        return slot_runs(key)

    def layer_shapes(self, layer: int, m_t: int) -> list[tuple[int, ...]]:
        return [(m_t, *trail) for _, trail in self.layers[layer]]

    def add_layer(self, layer: int, xs: Sequence[np.ndarray], runs: Sequence[Run], rows: bool = False) -> None:
        """Stage w x for the layer's names into the rows the slot runs name (applied by `commit`)."""
        m_t = len(xs[0]) if xs else 0
        weights = self._wrows[:m_t].copy() if rows else np.full(m_t, self._w, np.int64)
        scale = weights.astype(np.float64) * _SCALE
        for (name, _), x in zip(self.layers[layer], xs):
            terms = _terms(x, scale.reshape(-1, *([1] * (x.ndim - 1))), name)
            for lo, hi, g0, step in runs:
                index = slice(g0, g0 + hi - lo) if step == 1 else np.arange(g0, g0 + step * (hi - lo), step)
                self._staged.append((name, index, terms[lo:hi], weights[lo:hi]))

    def add_whole(self, name: str, x: np.ndarray) -> None:
        """Stage w x for a whole array (the head) under the update's weight."""
        self._staged.append((name, None, _terms(x, float(self._w) * _SCALE, name), np.array([self._w])))

    def commit(self) -> None:
        """Add the staged terms of one update; raises ValueError (nothing added) if a block's weights
        this round would reach 2^31, past the exact range."""
        staged, self._staged = self._staged, []
        for name, index, _, weights in staged:
            sums = self._weight_sum[name] if index is None else self._weight_sum[name][index]
            if np.any(sums + weights >= SUM_LIMIT):
                raise ValueError(f"{name!r}: this round's weights would reach 2^31, past the exact accumulator's "
                                 "range; lower the sample or token counts, or split the round")
        for name, index, terms, weights in staged:
            if index is None:
                self.acc[name] += terms
                self._weight_sum[name] += weights
            else:
                self.acc[name][index] += terms
                self._weight_sum[name][index] += weights

    def discard(self) -> None:
        self._staged.clear()

    def total(self, name: str) -> np.ndarray:
        """The float64 sum (a new array): acc / 2^24, rounded once when |acc| > 2^53."""
        return self.acc[name].astype(np.float64) / _SCALE

    # -- partial sums of sharded workers ----------------------------------------------------------------
    def partial(self) -> dict[str, np.ndarray]:
        """The int64 sums, by name (copies): what a worker sends its coordinator."""
        return {name: acc.copy() for name, acc in self.acc.items()}

    def merge(self, partial: Mapping[str, np.ndarray]) -> None:
        """Add another process's `partial()`: exact, in any order."""
        if set(partial) != set(self.acc):
            raise ValueError(f"partial sums name {sorted(set(partial) ^ set(self.acc))} that this round does not")
        for name, part in partial.items():
            if part.dtype != np.int64 or part.shape != self.acc[name].shape:
                raise ValueError(f"partial sum {name!r}: {part.dtype} {part.shape}, expected int64 "
                                 f"{self.acc[name].shape}")
        for name, part in partial.items():
            self.acc[name] += part


def _integer_weight(w, what: str) -> int:
    value = float(w)
    if not (value == math.floor(value) and 0 <= value < WEIGHT_LIMIT):
        raise ValueError(f"{what} {w!r}: exact aggregation needs integer weights in [0, {WEIGHT_LIMIT})")
    return int(value)


def _terms(x: np.ndarray, scale, name: str) -> np.ndarray:
    """int64 rint(x * scale), after checking |x| < 2^VALUE_BITS (NaN fails the check too)."""
    if x.size and not (x.min() > -_BOUND and x.max() < _BOUND):
        raise ValueError(f"{name!r}: values reach {max(abs(float(x.min())), abs(float(x.max()))):.4g}; exact "
                         f"aggregation holds |x| < {_BOUND:.0f}")
    scaled = np.multiply(x, scale, dtype=np.float64)
    return np.rint(scaled, out=np.empty(x.shape, np.int64), casting="unsafe")
