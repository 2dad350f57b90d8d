"""Order-independent weighted sums for sharded aggregation: integer fixed point, exact addition.

`ExactSums` keeps sum_n w_n x_n per aggregated array (rows = global experts) and per head array,
like `accumulate.SlotSums`, but every term is rounded once, on its own, to a fixed grid and the
terms are added as int64 integers, which is exact. The total therefore does not depend on the
order updates arrive in or on how they are split between processes: partial sums from several
aggregator workers, added together, are bit for bit what one process folding every update computes
(`merge`). Float addition is not associative, which is why `SlotSums` cannot offer this.

Per element, for an update with integer weight w (samples, or tokens routed to the row's expert):

    t = int64(rint(fl32(x * (w * 2^FRACTION_BITS))))  the product rounded once (float32, as SlotSums
                                                      rounds it), then to an integer; |t| < 2^53
    acc = acc + t                                     int64: exact while sum |t| < 2^63
    total = float64(acc) / 2^FRACTION_BITS            (the caller divides by sum w)

Limits that make every step exact, checked before an update changes anything (ValueError, the
caller rejects the update): |x| < 2^VALUE_BITS, weights integers in [0, 2^21), and one round's
weights summing to less than 2^31 per block (2^(63 - VALUE_BITS - FRACTION_BITS)). Error per term:
the float32 rounding of w x (relative 2^-24) plus half a grid step (2^-25 w absolute), so the
average is within float32 precision of the exact one (test: < 3e-8 absolute at |x| ~ 0.02).
An update is folded in two steps: `add_update` checks it and computes its integer terms
into preallocated scratch (O(model), not O(clients)) and `commit` adds them, so a refused update
leaves no trace.

Speed (`fftmoe bench aggregate --exact`, same run conditions as the default): 2.6 GB/s, 8% of a
memcpy, against SlotSums' 46-53%: a multiply, a rounding cast to int64 and an int64 add per element,
plus a min/max read. It serves sharded aggregation, where a worker's time goes to receiving updates
over MQTT (~0.2 GB/s per process, `fftmoe bench fleet`), not to folding them; one process folds
into SlotSums by default.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from broker_server.accumulate import Run, per_row

FRACTION_BITS = 24  # grid step of x: 2^-24 (times the weight)
VALUE_BITS = 8  # |x| < 256; adapter weights and biases are O(1)
WEIGHT_LIMIT = 1 << 21  # weights are integers below this: t < 2^(8 + 24 + 21) = 2^53, exact in float64
SUM_LIMIT = 1 << (63 - VALUE_BITS - FRACTION_BITS)  # sum of one round's weights per block: no int64 overflow
_SCALE = float(1 << FRACTION_BITS)
_BOUND = float(1 << VALUE_BITS)


class ExactSums:
    """sum_n w_n x_n as int64 fixed point; the interface of `accumulate.SlotSums` plus `commit`,
    `discard`, `partial` and `merge`.

    layers: layer -> [(name, trailing shape)] in the order a plan lists the arrays;
    whole: name -> shape of the arrays added in full (the head)."""

    def __init__(self, experts: int, layers: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]],
                 whole: Mapping[str, tuple[int, ...]]):
        self.experts = experts
        self.layers = {layer: [(name, tuple(trail)) for name, trail in cols] for layer, cols in layers.items()}
        shapes = {name: (experts, *trail) for cols in self.layers.values() for name, trail in cols}
        shapes.update({name: tuple(shape) for name, shape in whole.items()})
        self.shapes = shapes
        self.acc = {name: np.zeros(shape, np.int64) for name, shape in shapes.items()}
        # this round's weight sum per block (per layer and expert; per whole array), for the range check
        self._weight_sum = {**{layer: np.zeros(experts, np.int64) for layer in self.layers},
                            **{name: np.zeros(shape[0] if shape else 1, np.int64) for name, shape in whole.items()}}
        self._w = 0
        self._wrows = np.zeros(experts * len(self.layers), np.int64)  # per-slot weights of one update
        self._whead = np.zeros(0, np.int64)  # per-head-row weights of one update
        self._staged: list[tuple] = []  # (name, rows, int64 terms) of the update being folded
        self._weights: list[tuple] = []  # (layer or whole name, rows, int64 weights) of that update
        # preallocated scratch (fresh arrays of this size would be mmap'd and page-faulted per update):
        # the terms of one update, at most every row of every array, and one array's float64 product
        sizes = [math.prod(shape) for shape in shapes.values()]
        self._terms = np.empty(sum(sizes), np.int64)
        self._product = np.empty(max(sizes, default=0), np.float32)
        self._used = 0

    # -- the SlotSums interface the strategy folds through --------------------------------------------
    def reset(self) -> None:
        for acc in (*self.acc.values(), *self._weight_sum.values()):
            acc.fill(0)
        self.discard()

    def weight(self, w) -> float:
        """Set the update's weight (an integer in [0, 2^21)); returns it as a float."""
        self._w = _integer_weight(w, "num_samples")
        return float(self._w)

    def row_weights(self, w: np.ndarray) -> np.ndarray:
        """Per-slot integer weights [S] (routed tokens; the update's slots, layer after layer) for
        `add_update(..., rows=True)`; returns them as float64."""
        values = [_integer_weight(v, "routed tokens") for v in np.asarray(w).tolist()]
        self._wrows[:len(values)] = values
        return np.array(values, dtype=np.float64)

    def head_row_weights(self, w: np.ndarray) -> np.ndarray:
        """Per-row integer weights [C] of the head arrays (row y: samples of label y) for
        `add_update(..., head_rows=True)`; returns them as float64."""
        values = [_integer_weight(v, "label counts") for v in np.asarray(w).tolist()]
        self._whead = np.array(values, dtype=np.int64)
        return self._whead.astype(np.float64)

    def add_update(self, plan, arrays: Sequence[np.ndarray], rows: bool = False, f32: bool = False,
                   head_rows: bool = False) -> None:
        """Stage w x for the plan's summed arrays (`fold_plan.FoldPlan`; the caller checked the shapes),
        applied by `commit`. rows: layer slot i weighted by `row_weights`[i], else by `weight`; head_rows:
        head row y weighted by `head_row_weights`[y], else the head by `weight`. (f32 is SlotSums'
        fast-path hint; every dtype takes the same path here.)"""
        for lp in plan.layers:
            self._add_layer(lp.layer, arrays[lp.first:lp.end], lp.runs, rows, lp.row0)
        for name, x in plan.head_arrays(arrays):
            if head_rows and len(self._whead) != x.shape[0]:
                raise ValueError(f"{name!r}: {x.shape[0]} head rows, {len(self._whead)} head row weights")
            weights = self._whead if head_rows else np.array([self._w])
            self._check_range(name, slice(None), weights)
            scale = weights.astype(np.float32) * np.float32(_SCALE)  # exact: w < 2^21
            scale = per_row(scale, x.ndim) if head_rows else scale[0]
            self._staged.append((name, slice(None), self._stage(x, scale, name)))

    def _add_layer(self, layer: int, xs: Sequence[np.ndarray], runs: Sequence[Run], rows: bool, row0: int) -> None:
        m_t = len(xs[0]) if xs else 0
        weights = self._wrows[row0:row0 + m_t].copy() if rows else np.full(m_t, self._w, np.int64)
        scale = weights.astype(np.float32) * np.float32(_SCALE)  # exact: w < 2^21 has < 24 bits
        pieces = [(slice(g0, g0 + hi - lo) if step == 1 else np.arange(g0, g0 + step * (hi - lo), step), lo, hi)
                  for lo, hi, g0, step in runs]
        for index, lo, hi in pieces:
            self._check_range(layer, index, weights[lo:hi])
        for (name, _), x in zip(self.layers[layer], xs):
            terms = self._stage(x, per_row(scale, x.ndim), name)
            self._staged += [(name, index, terms[lo:hi]) for index, lo, hi in pieces]

    def commit(self) -> None:
        """Add the staged terms and weights of one update."""
        for name, index, terms in self._staged:
            self.acc[name][index] += terms
        for key, index, weights in self._weights:
            self._weight_sum[key][index] += weights
        self.discard()

    def discard(self) -> None:
        self._staged.clear()
        self._weights.clear()
        self._used = 0

    def _check_range(self, key, index, weights: np.ndarray) -> None:
        """Refuse (ValueError) weights that would take a block's round sum to 2^31, past the exact range."""
        if np.any(self._weight_sum[key][index] + weights >= SUM_LIMIT):
            raise ValueError(f"{key!r}: this round's weights would reach 2^31, past the exact accumulator's "
                             "range; lower the sample or token counts, or split the round")
        self._weights.append((key, index, weights))

    def _stage(self, x: np.ndarray, scale, name: str) -> np.ndarray:
        """int64 rint(x * scale) in the update's scratch, after checking |x| < 2^VALUE_BITS (NaN fails too)."""
        if x.size and not (x.min() > -_BOUND and x.max() < _BOUND):
            raise ValueError(f"{name!r}: values reach {max(abs(float(x.min())), abs(float(x.max()))):.4g}; exact "
                             f"aggregation holds |x| < {_BOUND:.0f}")
        if self._used + x.size > self._terms.size:
            raise ValueError(f"{name!r}: the update holds more values than the parameter space")
        product = self._product[:x.size].reshape(x.shape)
        np.multiply(x, scale, out=product)
        terms = self._terms[self._used:self._used + x.size].reshape(x.shape)
        self._used += x.size
        return np.rint(product, out=terms, casting="unsafe")

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

