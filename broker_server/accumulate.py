"""Weighted running sums for the streaming FFT-MoE merge: float32 windows spilled into float64.

`SlotSums` keeps sum_n w_n x_n per aggregated array [M, ...] (rows = global experts) and per head
array. Per element:

    float32 x (what devices upload by default): inner = saxpy(w, x, inner), BLAS level 1, in fold
                             order: fl32(inner + w * x), w the row's weight as float32, rounded once
                             or twice depending on whether the BLAS kernel fuses the multiply-add
    float16 x, or a clipped float64 x: t = fl32(w * x) (float16 widens exactly; float64 is multiplied
                             in float64 and rounded once), then inner = fl32(inner + t)
    after every spill_every-th update that added to the element's layer (head arrays: to the array):
                             outer = outer + float64(inner); inner = +0.0
    total = outer + float64(inner)

Every step is deterministic for a given fold order and BLAS build, so a round is bit-for-bit
reproducible (the audit replay relies on it), and splitting the work by block (whole arrays, each
worker seeing every update in the same order) reproduces it exactly: each array is processed by the
same calls either way. Memory: 4 + 8 bytes per model element, plus one array's rows of scratch.

Speed (2-core AMD EPYC, 32 MB L3, numpy 2.x, scipy's OpenBLAS 0.3, default export, `fftmoe bench
aggregate`, merge rate as a share of a memcpy of the same bytes in the same run). numpy has no fused
multiply-add ufunc, so a numpy fold is two calls per array, `multiply(x, w, out=tmp)` then `add(acc,
tmp, out=acc)`, two streams over memory where a copy makes one: the bench's floor column times
exactly that, 38-46%, and with slot routing, checks and denominators it was 29-34% (26-29% with
per-row token weights). BLAS saxpy (y <- a x + y) is that fused kernel: one call, one pass; alone
it ran at 71% (196 KB) to 88% (2.5 MB) of the copy on one thread. The merge now measures 50-54%
at 10 clients, 54-55% at 100 and 58-60% at 1,000 (three runs), and 38-49% with per-row weights.
What it took (each step measured on the 1,000-client run unless said):
- saxpy with keyword arguments on sliced views: 38%; the call is cheap (0.12-0.18 us against 0.46
  for numpy's multiply + add), but a slice and a reshape per call cost as much as the call;
- the calls precomputed per slot map (flat accumulator views cached) and x passed whole with an
  offset, positional arguments: 50-52%;
- OpenBLAS threads: a threaded saxpy measured 36% against 44% on one thread at these sizes, so
  a process's first `SlotSums` limits BLAS to one thread (`_one_blas_thread`);
- everything that depends only on the slot map worked out once per map (broker_server/fold_plan.py:
  checks, calls, per-expert tallies), leaving the Python around the calls at ~5 us per update
  (was 9 for a nano update, 26 for a large one): 58-64%, 10 clients 47-53%;
- 10 clients are a round start every 10 updates, and what ran before a round evicts what its first
  folds read (a fold right after finish() took 47 us, after only begin_round() 17, for the same
  update): finish() without boolean-mask copies (6.4 -> 1.6-2.4 ms) and the float64 sums neither
  zeroed per round nor read unless a spill wrote them: 50-54%.
Earlier numpy-only variants, for the record: a float64 accumulator (widening copy, multiply, add)
19%; cache blocking (scratch in L1) 20-30%, each block two more calls that restart the prefetcher;
adding x unweighted then (w - 1) x from cache 35% at best. The spill costs ~4% of merge time.

Precision (relative L2 error of the round's average after the final float32 rounding against an
exact float64 sum; 10/100/1000 clients, sample weights 10..500; client values = global ~N(0, 0.02)
+ local step ~N(0, 0.002), and independent ~N(0, 0.02) values as a cancellation-heavy worst case).
float64 accumulation: 2.5e-8 (the output rounding itself). float32 without spill grows like
sqrt(clients): 5.6e-8 / 1.6e-7 / 4.6e-7, and 1.4e-6 at 10,000 clients (past the ~1e-6 that FL
aggregation tolerates); the pseudo-gradient FedAdam steps on (aggregate - global) gets 1.3e-4 at
1000 clients (float64: 7.0e-6). Spill every 64: 5.6e-8 / 9.2e-8 / 3.9e-8, 2.7e-8 at 10,000, at most
1.5e-7 in the independent case at any count, pseudo-gradient 1.1e-5. Every 32: 2.9e-8 at 1000;
every 128: 6.4e-8.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import numpy as np
from scipy.linalg.blas import saxpy as _saxpy  # y <- a x + y, one pass: module docstring

SPILL_EVERY = 64  # updates per float32 window of a layer (or head array); error bought: module docstring

Run = tuple[int, int, int, int]  # local slots lo:hi -> global rows g0, g0 + step, ... (hi - lo rows)


@functools.cache
def _one_blas_thread() -> None:
    """Run BLAS single-threaded in this process, once, when it first builds sums to fold into.
    OpenBLAS splits a long saxpy across its threads, which on these array sizes (<= 196 KB) costs
    more than it gains: `fftmoe bench aggregate` measured 36% of memcpy threaded, 44% on one thread."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def slot_runs(slots: Sequence[int]) -> tuple[Run, ...]:
    """A slot map cut greedily into arithmetic progressions of global experts, each one strided view
    of the accumulator: [6, 7, 0, 1] -> ((0, 2, 6, 1), (2, 4, 0, 1)); [3, 2, 1, 0] -> ((0, 4, 3, -1),);
    [5, 1, 3] -> ((0, 2, 5, -4), (2, 3, 3, 1)).
    At most ceil(M_t / 2) pieces whatever the order; one when the slots are consecutive."""
    runs, lo, n = [], 0, len(slots)
    while lo < n:
        step = slots[lo + 1] - slots[lo] if lo + 1 < n else 1
        hi = lo + 1
        if step:  # a repeated slot (invalid, but foldable) is a piece of its own
            while hi < n and slots[hi] - slots[hi - 1] == step:
                hi += 1
        runs.append((lo, hi, int(slots[lo]), int(step) if hi - lo > 1 else 1))
        lo = hi
    return tuple(runs)


def per_row(v: np.ndarray, ndim: int) -> np.ndarray:
    """A vector [R] shaped [R, 1, ...] to scale the rows (axis 0) of an `ndim`-dimensional array."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def checked_runs(slots: Sequence[int], experts: int) -> tuple[Run, ...] | None:
    """`slot_runs(slots)`, or None when the map is empty or a slot is not a global expert index."""
    ok = bool(slots) and all(isinstance(g, (int, np.integer)) and 0 <= g < experts for g in slots)
    return slot_runs(slots) if ok else None


def _rows(g0: int, count: int, step: int) -> slice:
    end = g0 + step * count
    return slice(g0, end if end >= 0 else None, step)


class SlotSums:
    """sum_n w_n x_n for slotted arrays (rows = global experts), per layer, and for whole arrays.

    layers: layer -> [(name, trailing shape)] in the order a plan lists the arrays;
    whole: name -> shape of the arrays added in full (the head)."""

    def __init__(self, experts: int, layers: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]],
                 whole: Mapping[str, tuple[int, ...]], spill_every: int = SPILL_EVERY):
        if spill_every < 1:
            raise ValueError("spill_every must be >= 1")
        _one_blas_thread()
        self.experts, self.spill_every = experts, spill_every
        self.layers = {layer: [(name, tuple(trail)) for name, trail in cols] for layer, cols in layers.items()}
        shapes = {name: (experts, *trail) for cols in self.layers.values() for name, trail in cols}
        shapes.update({name: tuple(shape) for name, shape in whole.items()})
        self.inner = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        self.outer = {name: np.zeros(shape) for name, shape in shapes.items()}
        # one scratch for w * x: arrays are multiplied and added one at a time, so it is one array's
        # rows at most (<= 196 KB for the default export) and stays in L2 between the two calls
        self._flat = np.empty(max((math.prod(s) for s in shapes.values()), default=0), np.float32)
        self._w = np.zeros((), np.float32)  # the update's weight (a 0-d array is the cheapest operand)
        self._wf = 0.0  # the same as a Python float (what saxpy takes)
        self._wrows = np.zeros(experts * len(self.layers), np.float32)  # per-slot weights (activation weighting)
        self._wrow_list: list[float] = []
        self._whead = np.zeros(0, np.float32)  # per-head-row weights of one update (`head_row_weights`)
        self._groups = {**{layer: [name for name, _ in cols] for layer, cols in self.layers.items()},
                        **{name: [name] for name in whole}}  # what spills together
        self._count = dict.fromkeys(self._groups, 0)  # updates added per group since begin
        self._group_of = {name: group for group, names in self._groups.items() for name in names}
        self._spilled: set = set()  # groups whose float64 sums hold something this round
        self._cache: dict = {}  # views of the two-pass path, keyed by (layer, rows): finitely many

    def reset(self) -> None:
        """Start a round. The float64 sums are not zeroed: a group's first spill overwrites them, and a
        group that never spills (rounds of fewer than spill_every updates) never reads them. That keeps
        15 MB (default export) of writes at the round start, and 10 MB of reads at its end, out of the
        caches the first folds of the round need: `fftmoe bench aggregate` at 10 clients."""
        for inner in self.inner.values():
            inner.fill(0.0)
        self._count = dict.fromkeys(self._groups, 0)
        self._spilled.clear()

    def weight(self, w: float) -> float:
        """Set the update's weight; returns it as the float32 value the sums use (for denominators)."""
        self._w[...] = w
        self._wf = float(self._w)
        return self._wf

    def row_weights(self, w: np.ndarray) -> np.ndarray:
        """Set per-slot weights [S] (the update's slots, layer after layer) for `add_update(..., rows=True)`;
        returns them as the sums use them (float32 values, as float64)."""
        self._wrows[:len(w)] = w
        self._wrow_list = self._wrows[:len(w)].tolist()
        return self._wrows[:len(w)].astype(np.float64)

    def head_row_weights(self, w: np.ndarray) -> np.ndarray:
        """Set per-row weights [C] of the head arrays (row y: the update's samples of label y) for
        `add_update(..., head_rows=True)`; returns them as the sums use them (float32 values, as float64)."""
        self._whead = np.asarray(w, dtype=np.float32).copy()
        return self._whead.astype(np.float64)

    def add_update(self, plan, arrays: Sequence[np.ndarray], rows: bool = False, f32: bool = False,
                   head_rows: bool = False) -> None:
        """inner[name][slots] += w * x for the plan's summed arrays (`fold_plan.FoldPlan`; the caller
        checked the shapes). rows: layer slot i weighted by `row_weights`[i], else by `weight`; head_rows:
        head row y weighted by `head_row_weights`[y], else the head by `weight`. f32: every array is
        float32 (the caller's test), so each block is one saxpy."""
        if head_rows:
            self._add_head_rows(plan, arrays)
        if f32:
            flats = [x.ravel() for x in arrays]  # views: C-contiguous (a copy otherwise, which reads the same)
            layer_ops, head_ops = plan.calls.get(rows) or self._calls(plan, rows)
            w = self._wf
            if rows:
                weights = self._wrow_list
                for k, offset, n, acc, i in layer_ops:
                    _saxpy(flats[k], acc, n, weights[i], offset)
            else:
                for k, offset, n, acc, _ in layer_ops:
                    _saxpy(flats[k], acc, n, w, offset)  # acc[:n] += w * flats[k][offset:offset + n]; positional: cheaper
            for k, n, acc in () if head_rows else head_ops:
                _saxpy(flats[k], acc, n, w)
        else:  # float16 uploads, clipped float64 values: weigh into the scratch, then add
            for lp in plan.layers:
                self._two_pass_layer(lp.layer, arrays[lp.first:lp.end], lp.runs, rows, lp.row0)
            for name, x in () if head_rows else plan.head_arrays(arrays):
                self._two_pass_whole(name, x, self._w)
        count, every = self._count, self.spill_every
        for group in plan.groups:  # every spill_every-th update of a group (layer, head array) spills it
            count[group] += 1
            if count[group] % every == 0:
                self._spill(group)

    def _two_pass_whole(self, name: str, x: np.ndarray, w: np.ndarray) -> None:
        tmp = self._flat[:x.size].reshape(x.shape)
        np.multiply(x, w, tmp)
        np.add(self.inner[name], tmp, self.inner[name])

    def _add_head_rows(self, plan, arrays: Sequence[np.ndarray]) -> None:
        """The head arrays, row y (axis 0) weighted by `head_row_weights`[y]: a few small rows, so the
        two-pass multiply and add whatever the dtype (a saxpy per row would save nothing here)."""
        for name, x in plan.head_arrays(arrays):
            if len(self._whead) != x.shape[0]:
                raise ValueError(f"{name!r}: {x.shape[0]} head rows, {len(self._whead)} head row weights")
            self._two_pass_whole(name, x, per_row(self._whead, x.ndim))

    def _calls(self, plan, rows: bool) -> tuple[list, list]:
        """(layer saxpy calls as `_axpy_ops` gives them, with array and slot indices over the whole
        update; head calls as (array index, elements, flat accumulator)), kept on the plan: a plan
        belongs to the strategy that owns these sums."""
        layer_ops = [(lp.first + k, offset, n, acc, lp.row0 + i)
                     for lp in plan.layers for k, offset, n, acc, i in self._axpy_ops(lp.layer, lp.runs, rows)]
        head_ops = [(plan.head_first + k, self.inner[name].size, self.inner[name].reshape(-1))
                    for k, name in enumerate(plan.head)]
        plan.calls[rows] = (layer_ops, head_ops)
        return layer_ops, head_ops

    def _axpy_ops(self, layer: int, runs: Sequence[Run], rows: bool) -> list[tuple[int, int, int, np.ndarray, int]]:
        """(name index k, offset into the flat x, elements n, flat accumulator view, local slot) per
        saxpy call for this layer and slot map: a run of step 1 under one weight is one block,
        anything else one block per row. saxpy writes into the view in place: each is a contiguous
        slice of C-ordered rows, which f2py passes through without a copy (it would silently write into
        a copy of anything else)."""
        ops = []
        for k, (name, trail) in enumerate(self.layers[layer]):
            acc, row = self.inner[name], math.prod(trail)
            for lo, hi, g0, step in runs:
                if step == 1 and not rows:
                    ops.append((k, lo * row, (hi - lo) * row, acc[g0:g0 + hi - lo].reshape(-1), lo))
                else:
                    ops += [(k, (lo + i) * row, row, acc[g0 + step * i].reshape(-1), lo + i)
                            for i in range(hi - lo)]
        return ops

    def _two_pass_layer(self, layer: int, xs: Sequence[np.ndarray], runs: Sequence[Run], rows: bool,
                        row0: int) -> None:
        mul, add, w = np.multiply, np.add, self._w
        tmps = self._scratch(layer, 0, len(xs[0])) if xs else []
        if len(runs) == 1:  # slots in one progression: one add per array over the whole block
            for x, tmp, acc in zip(xs, tmps, self._acc_rows(layer, runs[0])):
                mul(x, self._row_weight(row0, len(x), x.ndim) if rows else w, tmp)
                add(acc, tmp, acc)
        else:
            pieces = [(self._acc_rows(layer, run), self._scratch(layer, run[0], run[1])) for run in runs]
            for k, (x, tmp) in enumerate(zip(xs, tmps)):
                mul(x, self._row_weight(row0, len(x), x.ndim) if rows else w, tmp)
                for accs, parts in pieces:
                    acc = accs[k]
                    add(acc, parts[k], acc)

    def commit(self) -> None:
        """Nothing to do: the adds above went straight into the sums (see ExactSums.commit)."""

    def discard(self) -> None:
        """Nothing to undo: SlotSums refuses nothing once the strategy's checks passed."""

    def total(self, name: str) -> np.ndarray:
        """The float64 sum so far (a new array)."""
        if self._group_of[name] in self._spilled:
            return self.outer[name] + self.inner[name]
        return self.inner[name].astype(np.float64)

    def _spill(self, group) -> None:
        """Move a group's float32 sums into float64 and restart them."""
        first = group not in self._spilled
        self._spilled.add(group)
        for name in self._groups[group]:
            if first:
                np.copyto(self.outer[name], self.inner[name])  # float32 -> float64: exact
            else:
                np.add(self.outer[name], self.inner[name], self.outer[name])
            self.inner[name].fill(0.0)

    def _acc_rows(self, layer: int, run: Run) -> list[np.ndarray]:
        """[inner[name] rows of the run] per name (cached)."""
        key = ("acc", layer, run[1] - run[0], run[2], run[3])
        views = self._cache.get(key)
        if views is None:
            rows = _rows(run[2], run[1] - run[0], run[3])
            views = self._cache[key] = [self.inner[name][rows] for name, _ in self.layers[layer]]
        return views

    def _scratch(self, layer: int, lo: int, hi: int) -> list[np.ndarray]:
        """[scratch rows lo:hi as (hi - lo, *trailing)] per name of the layer (cached)."""
        key = ("tmp", layer, lo, hi)
        views = self._cache.get(key)
        if views is None:
            views = self._cache[key] = [self._flat[lo * math.prod(t):hi * math.prod(t)].reshape(hi - lo, *t)
                                        for _, t in self.layers[layer]]
        return views

    def _row_weight(self, row0: int, m_t: int, ndim: int) -> np.ndarray:
        key = ("w", row0, m_t, ndim)
        view = self._cache.get(key)
        if view is None:
            view = self._cache[key] = self._wrows[row0:row0 + m_t].reshape(m_t, *([1] * (ndim - 1)))
        return view
