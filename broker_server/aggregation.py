"""FFT-MoE aggregation: a streaming, transport-agnostic strategy over named numpy arrays.

It is the server's merge rule (docs/METHOD.md "Aggregation"): per parameter block b (expert e of
layer l = row e on axis 0 of every slotted array of l; router row e of l; head row y)
`theta_b = sum_{n holds b} w_nb theta_b^n / sum_{n holds b} w_nb`, w = samples or routed tokens (a
head row: samples, or the update's samples of label y when it reports `label_counts`), then an
optional server optimiser (FedAvg, FedAdam) on the pseudo-gradient of the blocks held this round.
It also keeps the fleet's expert usage (EMA of token shares), computes the heterogeneity target q,
validates updates and clips their norm. It is not a transport, a round scheduler or a file format:
no MQTT, no wire decoding, no disk (the caller persists `optimizer_state()` as .npz).

Order of operations (sharded workers must reproduce it bit for bit). The weighted sums live in
`accumulate.SlotSums`: per element a float32 sum `inner` and a float64 sum `outer`, both +0.0 at
`begin_round`. Folding an update adds w x to `inner` for every element x it carries (one BLAS saxpy
per contiguous block for float32 x; multiply then add otherwise; accumulate.py gives the rounding),
with w the block's weight rounded to float32 (samples, or the slot's routed tokens; exact for
integers < 2^24), in fold order, and per block `den <- den + w` (float64, the same w). After every
64th update that touched a layer (the head: every 64th update), that layer's `outer <- outer +
float64(inner)` and `inner <- +0.0`. Blocks are independent, so splitting the work by block (each
worker seeing every update, in the same order) reproduces the result exactly; splitting by client
and adding partial sums does not (float addition is not associative). `AggregationConfig(exact=True)`
folds into `exact_sums.ExactSums` instead (integer fixed point, each term rounded on its own): the
result is then independent of fold order, and `partial()` / `merge()` split a round between processes
by client with the same bits as one process. A clipped update contributes
x' = g + s * (x - g), computed in float64 and rounded once by the weighting product, with s from the
norm of the whole update (`delta_norm`), so a sharded worker must be handed s. `finish` computes
`agg = (outer + inner) / den` in float64 for blocks with den > 0 (others, including an expert no
holder routed a token to under "activation", keep their value), applies the optimiser
(`FftMoeStrategy._adam`) in float64 and rounds once to the global dtype.

Why float32 windows and not a float64 accumulator (measured, details in accumulate.py): the
float64 fold ran at 19% of a memcpy of the same bytes (`fftmoe bench aggregate`), mostly a
widening copy plus a mixed-type add; float32 windows filled by BLAS saxpy run at 50-53%, and their
relative error against an exact sum stays between 2.7e-8 and 1.5e-7 from 10 to 10,000 clients
(float64: 2.5e-8, the output rounding).

Norm clip bound: `clip_bound` (fixed) and/or `clip_multiplier` x the median delta norm of the
previous round. Not this round's median: it is known only once every update has arrived, and
waiting for it would mean keeping every update (memory O(clients x model)); update norms move
slowly from round to round. Round 0 is unclipped unless a fixed bound is set.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from broker_server.accumulate import SlotSums, per_row
from broker_server.exact_sums import ExactSums
from broker_server.fold_plan import MAX_PLANS, FoldPlan, PlanKey, Tally, build_plan, plan_key
from broker_server.update_checks import head_rows
from edge_runtime.manifest import ParamEntry

WEIGHTINGS = ("samples", "activation")
OPTIMIZERS = ("fedavg", "fedadam")
_F32 = {np.dtype(np.float32)}  # the dtypes of an update SlotSums folds with one saxpy per block


class UpdateRejected(ValueError):
    """`fold` refused an update by policy (its norm); nothing was added to the round's sums."""


class ParamSpace:
    """The global parameter space (manifest.global_params): M-row stacks per adapted layer, and the head."""

    def __init__(self, entries: Sequence[ParamEntry]):
        self.entries = tuple(entries)
        self.by_name = {p.name: p for p in self.entries}
        self.head = [p for p in self.entries if p.slot_axis is None]
        slotted = [p for p in self.entries if p.slot_axis is not None]
        if any(p.slot_axis != 0 or p.layer is None for p in slotted) or len(self.by_name) != len(self.entries):
            raise ValueError("parameter space: slotted entries need slot_axis 0 and a layer; names must be unique")
        self.experts = slotted[0].shape[0] if slotted else 0  # M
        if any(p.shape[0] != self.experts for p in slotted):
            raise ValueError("parameter space: every slotted array must have M rows on axis 0")
        self.layers = sorted({p.layer for p in slotted})
        self.by_layer = {layer: [p for p in slotted if p.layer == layer] for layer in self.layers}
        rows = head_rows(p.shape for p in self.head)
        if self.head and rows is None:
            raise ValueError("parameter space: every head array must have one row per label on axis 0")
        self.head_rows = rows or 1  # C, the labels

    def tier_shapes(self, layers: Sequence[int], slots: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes a device with `slots` slots in `layers` trains (expected shapes for validation)."""
        shapes = {p.name: (slots, *p.shape[1:]) for layer in layers for p in self.by_layer[layer]}
        shapes.update({p.name: p.shape for p in self.head})
        return shapes

    def gather_slots(self, global_arrays: Mapping[str, np.ndarray], slot_map: Mapping[int, Sequence[int]]):
        """The arrays a device receives: for each of its layers the rows slot_map[l] of each stack, and the head."""
        out = {p.name: global_arrays[p.name][list(slot_map[layer])]  # [M_t, ...]
               for layer in sorted(slot_map) for p in self.by_layer[layer]}
        out.update({p.name: global_arrays[p.name] for p in self.head})
        return out


@dataclass(frozen=True)
class ClientUpdate:
    """One device's result for a round: trained arrays in tier shapes, in the slot order of slot_map."""

    device_id: str
    params: dict[str, np.ndarray]
    slot_map: dict[int, list[int]]  # layer -> global expert held in each local slot
    num_samples: int
    expert_tokens: dict[int, np.ndarray]  # layer -> [M_t] tokens routed to each local slot
    label_counts: np.ndarray | None = None  # [C] training samples per label: head row y weighs that many


@dataclass(frozen=True)
class AggregationConfig:
    """Merge rule and server optimiser. FedAdam as in Reddi et al., "Adaptive Federated Optimization"
    (ICLR 2021, Alg. 2, no bias correction): beta1 0.9 and beta2 0.99 are the values that paper fixes;
    it tunes eta and tau per task, and eta 1e-2 / tau 1e-3 are mid-range starting points of its grids,
    not an optimum measured for this model."""

    weighting: str = "samples"  # "samples" (the paper's |D_n|) or "activation" (tokens routed to e on n)
    personalise_router: bool = False  # router rows stay global here; devices keep their own
    router_lr: float = 1.0  # FedAvg server step on router rows: x <- x + router_lr * (average - x)
    exact: bool = False  # integer fixed-point sums (exact_sums.py): order-free, mergeable across workers
    optimizer: str = "fedavg"
    server_lr: float = 1e-2  # FedAdam eta
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    usage_decay: float = 0.5  # u <- decay*u + (1-decay)*share: reacts in ~2 rounds, damps client sampling noise
    clip_multiplier: float | None = None  # bound = multiplier x median delta norm of the previous round
    clip_bound: float | None = None  # a fixed bound; with both set the smaller one applies
    norm_policy: str = "clip"  # an update above the bound: "clip" it to the bound or "reject" it

    def __post_init__(self):
        checks = [(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}"),
                  (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
                  (self.server_lr > 0 and self.tau > 0, "server_lr and tau must be > 0"),
                  (0 <= self.router_lr <= 1, "router_lr must be in [0, 1]"),
                  (self.router_lr == 1 or self.optimizer == "fedavg", "router_lr is a FedAvg option"),
                  (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
                  (0 <= self.usage_decay < 1, "usage_decay must be in [0, 1)"),
                  (self.clip_multiplier is None or self.clip_multiplier > 0, "clip_multiplier must be > 0"),
                  (self.clip_bound is None or self.clip_bound > 0, "clip_bound must be > 0"),
                  (self.norm_policy in ("clip", "reject"), "norm_policy must be 'clip' or 'reject'")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"aggregation config: {message} (got {self})")


@dataclass(frozen=True)
class RoundStats:
    round: int  # index of the round just finished (0-based)
    clients: int
    samples: int
    bytes_folded: int
    held_experts: dict[int, int]  # layer -> global experts that received weight this round
    usage_share: dict[int, np.ndarray] = field(repr=False)  # layer -> [M] this round's token share
    usage_entropy: dict[int, float] = field(default_factory=dict)  # layer -> entropy (nats) of that share
    pseudo_grad_norm: float = 0.0  # L2 of aggregated - global over held blocks, before the optimiser
    clipped: int = 0
    clip_bound: float | None = None


@dataclass
class RoundPartial:
    """One worker's share of a round (FftMoeStrategy.partial): int64 sums and the counts beside them."""
    sums: dict[str, np.ndarray]  # name -> int64 fixed-point sum (exact_sums.py)
    den: dict[int, list[float]]  # layer -> [M] weight per global expert
    tokens: dict[int, list[float]]  # layer -> [M] tokens routed per global expert
    head_den: list[float]  # weight per head row (one number: the same for every row)
    clients: int
    samples: int
    bytes_folded: int
    clipped: int
    norms: list[float]


class Strategy(abc.ABC):
    """Transport-agnostic round strategy over named arrays (Flower's Strategy, minus the transport)."""

    @abc.abstractmethod
    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def fold(self, update: ClientUpdate) -> None:
        """Fold one validated update into the running sums; the update is not kept."""

    @abc.abstractmethod
    def finish(self) -> tuple[dict[str, np.ndarray], RoundStats]: ...


class FftMoeStrategy(Strategy):
    """Blockwise weighted averaging of expert slots, router rows and head, streamed; memory O(model)."""

    def __init__(self, space: ParamSpace, config: AggregationConfig = AggregationConfig()):
        self.space, self.config = space, config
        self.rounds = 0
        m = space.experts
        # per layer the names aggregated (all but a personalised router), in manifest order
        self._names = {layer: [p.name for p in entries
                               if not (config.personalise_router and p.name.endswith(".router"))]
                       for layer, entries in space.by_layer.items()}
        self._unmerged = {layer: [(p.name, p.shape[1:]) for p in entries if p.name not in self._names[layer]]
                          for layer, entries in space.by_layer.items()}  # still shape-checked
        sums_class = ExactSums if config.exact else SlotSums
        summed = {layer: [(n, space.by_name[n].shape[1:]) for n in names] for layer, names in self._names.items()}
        self._sums = sums_class(m, summed, {p.name: p.shape for p in space.head})
        self._plan_parts = (summed, self._unmerged, [(p.name, p.shape) for p in space.head], m, list(space.layers))
        self._plans: dict[PlanKey, FoldPlan] = {}  # per slot map seen (bounded: MAX_PLANS)
        self._tally = Tally(space.layers, m)  # this round's weight and tokens per block
        self.usage = {layer: np.full(m, 1.0 / m) for layer in space.layers}  # EMA share, uniform at start
        self._opt_m = {p.name: np.zeros(p.shape) for p in space.entries}
        self._opt_v = {p.name: np.zeros(p.shape) for p in space.entries}
        self._prev_median = math.nan  # median delta norm of the previous round (clip bound source)
        self._global: dict[str, np.ndarray] | None = None

    # -- round ------------------------------------------------------------------------------------
    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        missing = set(self.space.by_name) ^ set(global_arrays)
        bad = [n for n, p in self.space.by_name.items() if n in global_arrays and global_arrays[n].shape != p.shape]
        if missing or bad:
            raise ValueError(f"global arrays do not match the parameter space: names {sorted(missing)}, shapes {bad}")
        self._global = {n: np.array(global_arrays[n], copy=True) for n in self.space.by_name}
        self._sums.reset()
        self._tally.reset()
        self._clients = self._samples = self._bytes = self._clipped = 0
        self._head_den = np.zeros(self.space.head_rows)  # weight per head row
        self._norms: list[float] = []  # 8 B per client, only when clipping by median
        bounds = [b for b in (self.config.clip_bound,
                              self.config.clip_multiplier and self.config.clip_multiplier * self._prev_median)
                  if b is not None and b > 0]  # NaN (no history) and 0 (all-zero deltas) mean no bound
        self._bound = min(bounds) if bounds else None

    @property
    def clip_bound(self) -> float | None:
        """The norm bound of the round begun (fixed and / or from the previous round's median)."""
        return self._bound

    def fold(self, update: ClientUpdate) -> None:
        if self._global is None:
            raise RuntimeError("fold() before begin_round()")
        plan, arrays, tokens = self._checked(update)  # every structural check, before any sum changes
        f32 = {x.dtype for x in arrays} == _F32
        norm, clipped = None, False
        if self.config.clip_multiplier is not None or self._bound is not None:
            norm = delta_norm(update, self._global, self.space, self.config.personalise_router)
            if self._bound is not None and norm > self._bound and self.config.norm_policy == "reject":
                raise UpdateRejected(f"update norm {norm:.4g} exceeds the bound {self._bound:.4g} "
                                     "(norm policy: reject)")  # before any sum changed; not in the median
            if self._bound is not None and norm > self._bound:
                params = clipped_params(update, self._global, self.space, self._bound / norm)
                arrays, f32, clipped = [params[n] for n in plan.names], False, True
        sums, by_tokens = self._sums, self.config.weighting == "activation"
        try:
            samples = sums.weight(update.num_samples)  # the weight the sums use, as a float
            row_weights = sums.row_weights(tokens) if by_tokens else None
            by_label = update.label_counts is not None
            head_weights = sums.head_row_weights(update.label_counts) if by_label else samples
            sums.add_update(plan, arrays, rows=by_tokens, f32=f32, head_rows=by_label)
            sums.commit()
        except ValueError as err:
            if not self.config.exact:
                raise  # SlotSums refuses nothing _checked let through: a bug, not a bad update
            sums.discard()  # ExactSums staged the update and refused a value out of its range
            raise UpdateRejected(str(err)) from None
        if norm is not None:
            self._norms.append(norm)
            self._clipped += clipped
        self._tally.add(plan, samples, tokens, row_weights)
        self._head_den += head_weights
        self._clients += 1
        self._samples += int(update.num_samples)
        if f32 and len(update.params) == len(plan.names):
            self._bytes += plan.nbytes32
        else:
            self._bytes += sum(a.nbytes for a in update.params.values())

    def partial(self) -> RoundPartial:
        """This process's share of the round so far, for a coordinator's `merge` (exact sums only)."""
        if not self.config.exact:
            raise RuntimeError("partial sums merge exactly only with AggregationConfig(exact=True)")
        return RoundPartial(self._sums.partial(), {k: v.tolist() for k, v in self._tally.weights().items()},
                            {k: v.tolist() for k, v in self._tally.tokens().items()}, self._head_den.tolist(),
                            self._clients,
                            self._samples, self._bytes, self._clipped, list(self._norms))

    def merge(self, part: RoundPartial) -> None:
        """Add another process's `partial()` of this round: the result is bit for bit what folding its
        updates here would give, in any order (integer sums; weights are integers, so their float sums
        are exact too)."""
        if self._global is None or not self.config.exact:
            raise RuntimeError("merge() needs begin_round() and AggregationConfig(exact=True)")
        head_den = np.asarray(part.head_den, dtype=np.float64)
        if head_den.shape not in ((1,), self._head_den.shape):
            raise ValueError(f"partial sums weigh {len(head_den)} head rows; the head has {len(self._head_den)}")
        self._tally.merge(part.den, part.tokens)  # checks the layers and experts first
        self._sums.merge(part.sums)
        self._head_den += head_den
        self._clients += part.clients
        self._samples += part.samples
        self._bytes += part.bytes_folded
        self._clipped += part.clipped
        self._norms += part.norms

    def _checked(self, update: ClientUpdate) -> tuple[FoldPlan, list[np.ndarray], np.ndarray]:
        """(plan, the arrays it names, routed tokens [S] layer after layer) after the structural checks that
        keep a malformed update from half-folding the round (values are `validate_update`'s job)."""
        key = plan_key(update.slot_map)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = build_plan(key, *self._plan_parts)
        try:
            arrays = [update.params[n] for n in plan.names]
            counts = [update.expert_tokens[layer] for layer, _ in key]
        except KeyError as err:
            raise ValueError(f"update from {update.device_id!r} does not fit the parameter space: "
                             f"no {err}") from None
        if [x.shape for x in arrays] != plan.shapes:
            name, shape, expected = next((n, x.shape, s) for n, x, s in zip(plan.names, arrays, plan.shapes)
                                         if x.shape != s)
            raise ValueError(f"{name!r}: shape {shape}, expected {expected} for the update's slot map")
        if [len(c) for c in counts] != plan.token_lens:
            raise ValueError("the routed tokens and the slot map disagree on the slots")
        if update.label_counts is not None and np.shape(update.label_counts) != self._head_den.shape:
            raise ValueError(f"label_counts: shape {np.shape(update.label_counts)}, expected {self._head_den.shape} "
                             "(one count per head row)")
        return plan, arrays, np.concatenate(counts).astype(np.float64, copy=False)

    def finish(self) -> tuple[dict[str, np.ndarray], RoundStats]:
        if self._global is None:
            raise RuntimeError("finish() before begin_round()")
        new, sq = {}, 0.0
        weights = self._tally.weights()
        for p in self.space.entries:
            rows = self._held_rows(p, weights)
            if rows is None:
                new[p.name] = self._global[p.name].copy()
                continue
            agg = self._aggregate(p, rows, weights)  # float64 [held rows, ...]
            x = self._global[p.name].astype(np.float64)
            delta = agg - x[rows]  # the pseudo-gradient
            sq += float(np.sum(delta * delta))
            if self.config.optimizer == "fedadam":
                x[rows] = self._adam(p.name, x[rows], delta, rows)
            elif p.name.endswith(".router") and self.config.router_lr != 1:
                x[rows] += self.config.router_lr * delta  # a damped router step (0: the global gate stays put)
            else:
                x[rows] = agg
            new[p.name] = x.astype(self._global[p.name].dtype)
        share, entropy = {}, {}
        decay = self.config.usage_decay
        den = self._tally.weights()
        for layer, routed in self._tally.tokens().items():
            counts = routed.copy()  # [M]
            total = counts.sum()
            if total > 0:  # a layer nobody routed through keeps its usage
                share[layer] = counts / total  # [M]
                entropy[layer] = share_entropy(counts)
                self.usage[layer] = decay * self.usage[layer] + (1 - decay) * share[layer]
        if self._norms:
            self._prev_median = float(np.median(self._norms))
        held = {layer: int(np.sum(d > 0)) for layer, d in den.items()}
        stats = RoundStats(round=self.rounds, clients=self._clients, samples=self._samples,
                           bytes_folded=self._bytes, held_experts=held,
                           usage_share=share, usage_entropy=entropy, pseudo_grad_norm=math.sqrt(sq),
                           clipped=self._clipped, clip_bound=self._bound)
        self.rounds += 1
        self._global = None
        return new, stats

    def _held_rows(self, p: ParamEntry, weights: Mapping[int, np.ndarray]) -> slice | np.ndarray | None:
        """The rows of `p` someone held this round: all of them as a slice (a view, where a boolean mask
        would copy: finish() went from 6.4 to N ms), a boolean mask [M], or None for none."""
        if p.slot_axis is None:  # a head row is held by the updates that weigh it (label counts)
            held = self._head_den > 0
            return slice(None) if held.all() else held if held.any() else None
        if p.name not in self._names[p.layer]:
            return None  # personalised router: never aggregated
        held = weights[p.layer] > 0
        return slice(None) if held.all() else held if held.any() else None

    def _aggregate(self, p: ParamEntry, rows: slice | np.ndarray, weights: Mapping[int, np.ndarray]) -> np.ndarray:
        """The weighted average of the held rows (the head: the whole array), float64."""
        total = self._sums.total(p.name)  # float64 [M, ...], a new array
        den = per_row(self._head_den if p.slot_axis is None else weights[p.layer], len(p.shape))  # [C or M, 1, ...]
        if isinstance(rows, slice):
            return np.divide(total, den, out=total)
        return total[rows] / den[rows]

    def _adam(self, name: str, x: np.ndarray, delta: np.ndarray, held: np.ndarray) -> np.ndarray:
        """FedAdam on the held blocks: m <- b1 m + (1-b1) d; v <- b2 v + (1-b2) d^2;
        x <- x + eta m / (sqrt(v) + tau), in that order. (FedAvg is server lr 1: x <- the average.)"""
        c = self.config
        m = c.beta1 * self._opt_m[name][held] + (1 - c.beta1) * delta
        v = c.beta2 * self._opt_v[name][held] + (1 - c.beta2) * (delta * delta)
        self._opt_m[name][held], self._opt_v[name][held] = m, v
        return x + c.server_lr * m / (np.sqrt(v) + c.tau)

    # -- state ------------------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Everything besides usage and the global arrays that later rounds depend on, as named arrays."""
        state = {f"fedadam.m.{n}": a.copy() for n, a in self._opt_m.items()}
        state.update({f"fedadam.v.{n}": a.copy() for n, a in self._opt_v.items()})
        state["clip.prev_median"] = np.array(self._prev_median)
        state["rounds"] = np.array(self.rounds, dtype=np.int64)
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        expected = self.optimizer_state()
        if set(state) != set(expected):
            raise ValueError(f"optimizer state keys differ: missing {sorted(set(expected) - set(state))}, "
                             f"unknown {sorted(set(state) - set(expected))}")
        for key, ref in expected.items():
            if np.shape(state[key]) != ref.shape:
                raise ValueError(f"optimizer state {key!r}: shape {np.shape(state[key])}, expected {ref.shape}")
        for name in self._opt_m:
            self._opt_m[name][...] = state[f"fedadam.m.{name}"]
            self._opt_v[name][...] = state[f"fedadam.v.{name}"]
        self._prev_median = float(state["clip.prev_median"])
        self.rounds = int(state["rounds"])

    def load_usage(self, usage: Mapping) -> None:
        """Restore the usage EMA (layer -> [M] share); keys may be ints or their strings (JSON)."""
        for key, share in usage.items():
            layer, share = int(key), np.asarray(share, dtype=np.float64)
            if layer not in self.usage or share.shape != (self.space.experts,):
                raise ValueError(f"usage for layer {key!r}: expected a layer of {self.space.layers} and "
                                 f"{self.space.experts} shares")
            self.usage[layer] = share.copy()


def share_entropy(counts: np.ndarray) -> float | None:
    """Entropy (nats) of the token share over experts given token counts [M]; None if nothing was routed."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    share = counts[counts > 0] / total
    return float(-np.sum(share * np.log(share)))


def het_target(usage: np.ndarray, slots: Sequence[int], gamma: float = 1.0, eps: float = 1e-3) -> np.ndarray:
    """q over a device's held slots, q_i proportional to (u[slots[i]] + eps)^-gamma (METHOD.md "Loss")."""
    if gamma < 0 or eps <= 0 or len(set(slots)) != len(slots) or not all(0 <= g < len(usage) for g in slots):
        raise ValueError("het_target needs gamma >= 0, eps > 0 and distinct slots within the usage vector")
    raw = (np.asarray(usage, dtype=np.float64)[list(slots)] + eps) ** (-gamma)  # [M_t]
    return raw / raw.sum()


def delta_norm(update: ClientUpdate, global_arrays: Mapping[str, np.ndarray], space: ParamSpace,
               personalise_router: bool = False) -> float:
    """L2 norm (float64) of the update minus the global slots it was given, over the aggregated arrays."""
    given = space.gather_slots(global_arrays, update.slot_map)
    sq = 0.0
    for name in sorted(update.params):  # fixed order so a sharded worker gets the same float
        if personalise_router and name.endswith(".router"):
            continue
        d = update.params[name].astype(np.float64) - given[name]
        sq += float(np.sum(d * d))
    return math.sqrt(sq)


def clipped_params(update: ClientUpdate, global_arrays: Mapping[str, np.ndarray], space: ParamSpace,
                   scale: float) -> dict[str, np.ndarray]:
    """`g + scale * (x - g)` per array in float64 (g = the global slots given), so ||delta|| shrinks by `scale`."""
    given = space.gather_slots(global_arrays, update.slot_map)
    out = {}
    for name, x in update.params.items():
        g = given[name].astype(np.float64)
        out[name] = g + scale * (x.astype(np.float64) - g)
    return out
