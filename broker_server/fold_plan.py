"""What folding an FFT-MoE update needs that depends only on its slot map, worked out once per map;
and the round's per-expert tallies of weights and routed tokens.

A round's updates come in few distinct slot maps (tiers times the slot planner's choices), and all
of an update's fold except its values is decided by its map: which arrays it must hold and their
shapes, which accumulator rows each slot adds into, which (layer, global expert) each slot's weight
and tokens count for. `FoldPlan` holds that, so per update only the checks that cannot be cached
(the arrays are there, with these shapes) and the BLAS calls remain. `Tally` adds an update's
weight and tokens to its plan's running sums (one scalar and one vector add) and spreads them over
global experts only when they are read, instead of two Python adds per slot.

Measured on a large-tier update (2.5 MB, 62 saxpy calls; `fftmoe bench aggregate` shapes): the
Python around the BLAS calls was 26 us of an 89 us fold (per-layer checks and slot-map
decompositions, a dtype test per array, per-slot tallies); see accumulate.py for the rates.

Not here: the sums of parameter values (accumulate.py, exact_sums.py) and the value checks
(update_checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from broker_server.accumulate import Run, checked_runs

PlanKey = tuple[tuple[int, tuple[int, ...]], ...]  # ((layer, slots), ...) in the slot map's order
MAX_PLANS = 256  # per-plan running sums a Tally keeps before spreading them (memory O(model), not O(clients))


def plan_key(slot_map: Mapping[int, Sequence[int]]) -> PlanKey:
    return tuple([(layer, tuple(slots)) for layer, slots in slot_map.items()])


@dataclass(frozen=True, eq=False)
class LayerPlan:
    layer: int
    slots: tuple[int, ...]  # global expert per local slot
    runs: tuple[Run, ...]  # the slots as strided accumulator views (accumulate.slot_runs)
    first: int  # the layer's summed arrays are FoldPlan.names[first:end]
    end: int
    row0: int  # its slots start at this position of the update's slot vector (tokens, row weights)


@dataclass(frozen=True, eq=False)
class FoldPlan:
    key: PlanKey
    layers: tuple[LayerPlan, ...]
    names: tuple[str, ...]  # arrays the update must hold: summed layer arrays, the head, then checked-only ones
    shapes: list[tuple[int, ...]]  # the shape each must have
    summed: int  # names[:summed] go into the sums (layer arrays, then the head)
    head: tuple[str, ...]  # names[head_first:summed]
    groups: tuple  # what spills together (accumulate.SlotSums): the layers, then the head arrays
    token_lens: list[int]  # slots per layer, the length each layer's routed tokens must have
    index: np.ndarray  # [slots over all layers] layer position * M + global expert, all distinct
    nbytes32: int  # the update's bytes when every array is float32 and it holds nothing else
    calls: dict = field(default_factory=dict)  # the sums' precomputed calls for this plan (SlotSums._calls)

    @property
    def head_first(self) -> int:
        """Where the head's arrays start in `names`."""
        return self.summed - len(self.head)

    def head_arrays(self, arrays: Sequence[np.ndarray]):
        """(name, array) of the head, from an update's arrays listed as `names`."""
        return zip(self.head, arrays[self.head_first:self.summed])


def build_plan(key: PlanKey, summed: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]],
               checked: Mapping[int, Sequence[tuple[str, tuple[int, ...]]]],
               head: Sequence[tuple[str, tuple[int, ...]]], experts: int, layers: Sequence[int]) -> FoldPlan:
    """The plan for one slot map. summed / checked: layer -> [(name, trailing shape)] of the arrays that
    are aggregated / only shape-checked (a personalised router); head: [(name, shape)]; layers: the
    space's layers, in order. ValueError (naming the layer) for a map that does not fit."""
    names, shapes, plans, index, row0 = [], [], [], [], 0
    for layer, slots in key:
        runs = checked_runs(slots, experts)
        if layer not in summed or runs is None or len(set(slots)) != len(slots):
            raise ValueError(f"layer {layer}: slot map {list(slots)} does not fit the parameter space (layers "
                             f"{list(layers)}, distinct experts in [0, {experts}))")
        first = len(names)
        names += [name for name, _ in summed[layer]]
        shapes += [(len(slots), *trail) for _, trail in summed[layer]]
        plans.append(LayerPlan(layer, slots, runs, first, len(names), row0))
        index += [layers.index(layer) * experts + g for g in slots]
        row0 += len(slots)
    names += [name for name, _ in head]
    shapes += [tuple(shape) for _, shape in head]
    n_summed = len(names)
    for layer, slots in key:
        names += [name for name, _ in checked.get(layer, ())]
        shapes += [(len(slots), *trail) for _, trail in checked.get(layer, ())]
    return FoldPlan(key, tuple(plans), tuple(names), shapes, n_summed, tuple(name for name, _ in head),
                    tuple(p.layer for p in plans) + tuple(name for name, _ in head),
                    [len(p.slots) for p in plans], np.array(index, dtype=np.intp),
                    4 * sum(int(np.prod(s)) for s in shapes))


class Tally:
    """This round's sums of weights and routed tokens per (layer, global expert), kept per plan until read."""

    def __init__(self, layers: Sequence[int], experts: int):
        self.layers, self.experts = list(layers), experts
        self._weight = np.zeros(len(self.layers) * experts)  # [L * M], row = layer position
        self._tokens = np.zeros(len(self.layers) * experts)
        self._plans: dict[PlanKey, list] = {}  # key -> [plan, weight sum, row weight sums [S] or None, tokens [S]]

    def reset(self) -> None:
        self._weight.fill(0.0)
        self._tokens.fill(0.0)
        self._plans.clear()

    def add(self, plan: FoldPlan, weight: float, tokens: np.ndarray, row_weights: np.ndarray | None) -> None:
        """One update: `weight` on every slot, or `row_weights` [S] slot by slot; `tokens` [S]."""
        entry = self._plans.get(plan.key)
        if entry is None:
            if len(self._plans) >= MAX_PLANS:
                self._spread()
            entry = self._plans[plan.key] = [plan, 0.0, None, np.zeros(len(plan.index))]
        if row_weights is None:
            entry[1] += weight
        elif entry[2] is None:
            entry[2] = row_weights.astype(np.float64)  # a copy
        else:
            entry[2] += row_weights
        entry[3] += tokens

    def weights(self) -> dict[int, np.ndarray]:
        """layer -> [M] weight summed over the updates that held each expert (a view; read, don't keep)."""
        self._spread()
        return self._by_layer(self._weight)

    def tokens(self) -> dict[int, np.ndarray]:
        """layer -> [M] tokens routed to each expert this round."""
        self._spread()
        return self._by_layer(self._tokens)

    def merge(self, weights: Mapping[int, Sequence[float]], tokens: Mapping[int, Sequence[float]]) -> None:
        """Add another process's `weights()` and `tokens()` (lists per layer)."""
        if {int(k) for k in weights} != set(self.layers) or {int(k) for k in tokens} != set(self.layers) or any(
                len(v) != self.experts for v in (*weights.values(), *tokens.values())):
            raise ValueError("partial sums cover other layers or experts than this strategy")
        mine_w, mine_t = self.weights(), self.tokens()
        for layer in self.layers:
            mine_w[layer] += np.asarray(weights[layer], dtype=np.float64)
            mine_t[layer] += np.asarray(tokens[layer], dtype=np.float64)

    def _spread(self) -> None:
        for plan, weight, row_weights, tokens in self._plans.values():
            # plan.index holds distinct positions, so a fancy-indexed add adds once per slot
            self._weight[plan.index] += weight if row_weights is None else row_weights + weight
            self._tokens[plan.index] += tokens
        self._plans.clear()

    def _by_layer(self, flat: np.ndarray) -> dict[int, np.ndarray]:
        rows = flat.reshape(len(self.layers), self.experts)
        return {layer: rows[i] for i, layer in enumerate(self.layers)}
