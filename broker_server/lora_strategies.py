"""Server-side aggregation of the LoRA baselines (FedIT, HetLoRA, FlexLoRA) as streaming strategies.

These are the comparison methods of METHOD.md "Baselines", behind the same transport-agnostic `Strategy`
interface as FFT-MoE (`begin_round(global)`, `fold(update)` per update, `finish() -> (global, stats)`),
over named numpy arrays. A LoRA adapter on a frozen weight W [d_out, d_in] is `delta W = B A`, B
[d_out, r], A [r, d_in]; the arrays are named `<base>.fftmoe_lora_A` and `<base>.fftmoe_lora_B` (`<base>` names W),
and the classifier head (names starting `fftmoe_head`) is trained in full and FedAvg'd by every method.
Weights are the clients' sample counts; sums are float64 running sums, so folding updates in any order
gives the same result up to float64 rounding, and no update is kept. A client may adapt only some of the
weights (a small tier adapts only the top layers, as in FFT-MoE): each adapted weight is averaged over the
clients that hold it, and a weight nobody held this round keeps its value.

- FedIT (Zhang et al. 2024): one rank r for every client; FedAvg of A and of B separately.
- HetLoRA (Cho et al. 2024): client ranks r_n <= r_max; each client's A is zero-padded in rows and B in
  columns to r_max, then averaged; client n gets back the top r_n rows of A / columns of B. Only the plain
  zero-pad + weighted average: not the paper's optional rank self-pruning nor its sparsity-weighted
  aggregation. As in the paper, the average runs over all clients of the round, so rank components that
  no client of the round holds come back as zeros (a round of only low-rank clients zeroes the top rows).
- FlexLoRA (Bai et al. 2024): the global state is the full product, `<base>.fftmoe_lora_BA` [d_out, d_in] per
  adapted weight: `sum_n w_n B_n A_n / sum_n w_n`. Client n gets the best rank-r_n approximation of it
  by truncated SVD, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (Eckart-Young). Memory: the global and the
  running sum are d_out x d_in per adapted weight (float64 sum: 8 d_out d_in bytes; 19 MB for a
  768 x 3072 FFN projection), against r_max (d_out + d_in) for the factor-based methods. Directions with
  a zero singular value come back as zero columns of B and zero rows of A, which plain gradient descent
  cannot revive; so in round 0 (global product all zero) devices should start from their own LoRA init.

Not here: the transport, the choice of ranks per tier, LoRA initialisation, the device-side training,
a server optimiser (all three are plain FedAvg, as published), or update clipping.

Stats: the FFT-MoE `RoundStats` fits (the expert-usage fields stay empty), so the server's round
record works unchanged. `Strategy.fold` is annotated with FFT-MoE's `ClientUpdate`; these strategies take
a `LoraUpdate` (device_id, params, num_samples, rank) instead: the two methods are never mixed in a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from broker_server.aggregation import RoundStats, Strategy
from broker_server.accumulate import per_row
from broker_server.update_checks import head_rows, label_count_problems
from edge_runtime import manifest

# Suffixes of the factor names the exporter writes (edge_runtime.manifest), and of FlexLoRA's global product.
LORA_A, LORA_B, LORA_PRODUCT = "." + manifest.LORA_A, "." + manifest.LORA_B, "." + manifest.LORA_B + "A"
HEAD_PREFIX = "fftmoe_head"


@dataclass(frozen=True)
class LoraUpdate:
    """One device's result for a round: its LoRA factors at its own rank, and the head."""

    device_id: str
    params: dict[str, np.ndarray]  # <base>.fftmoe_lora_A [rank, d_in], <base>.fftmoe_lora_B [d_out, rank], head arrays
    num_samples: int
    rank: int
    label_counts: np.ndarray | None = None  # [C] training samples per label: head row y weighs that many


@dataclass(frozen=True)
class LoraSpace:
    """The adapted weights (base name -> (d_out, d_in)) and the head arrays (name -> shape)."""

    adapted: Mapping[str, tuple[int, int]]
    head: Mapping[str, tuple[int, ...]]

    def __post_init__(self):
        bad = [n for n in self.head if not n.startswith(HEAD_PREFIX)]
        bad += [n for n, s in self.adapted.items() if len(s) != 2 or min(s) < 1 or n.startswith(HEAD_PREFIX)]
        if bad or not self.adapted:
            raise ValueError(f"LoRA space: needs >= 1 adapted weight with a (d_out, d_in) shape and head names "
                             f"starting {HEAD_PREFIX!r}; bad entries {bad}")

    @classmethod
    def from_factor_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[LoraSpace, int]:
        """(space, rank) from the names and shapes of one set of factors at one rank (e.g. r_max)."""
        adapted, head, ranks = {}, {}, set()
        for name, shape in shapes.items():
            base = name[: -len(LORA_A)]
            if name.startswith(HEAD_PREFIX):
                head[name] = tuple(shape)
            elif name.endswith(LORA_A) and base + LORA_B in shapes:
                shape_b = shapes[base + LORA_B]  # A [r, d_in], B [d_out, r]
                adapted[base] = (shape_b[0], shape[1])
                ranks |= {shape[0], shape_b[1]}
            elif not (name.endswith(LORA_B) and name[: -len(LORA_B)] + LORA_A in shapes):
                raise ValueError(f"{name!r} is neither a head array nor half of a {LORA_A}/{LORA_B} pair")
        if len(ranks) != 1:
            raise ValueError(f"factors disagree on the rank: {sorted(ranks)}")
        return cls(adapted, head), ranks.pop()

    def factor_shapes(self, rank: int, bases: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the arrays a client at `rank` adapting `bases` (default: all) trains and sends."""
        shapes: dict[str, tuple[int, ...]] = {}
        for base in self.adapted if bases is None else bases:
            d_out, d_in = self.adapted[base]
            shapes[base + LORA_A], shapes[base + LORA_B] = (rank, d_in), (d_out, rank)
        shapes.update(self.head)
        return shapes


class _LoraStrategy(Strategy):
    """Sample-weighted float64 running sums over the global arrays; subclasses say what a client adds."""

    def __init__(self, space: LoraSpace, r_max: int):
        smallest = min(min(s) for s in space.adapted.values())
        if isinstance(r_max, bool) or not isinstance(r_max, int) or not 1 <= r_max <= smallest:
            raise ValueError(f"r_max must be an integer in [1, {smallest}] (the smallest adapted dimension), "
                             f"got {r_max!r}")
        self.space, self.r_max, self.rounds = space, r_max, 0
        self._head_rows = head_rows(space.head.values())  # C, the labels (None: no head to weigh by row)
        self._global: dict[str, np.ndarray] | None = None

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the global state (FedIT, HetLoRA: the factors at r_max)."""
        return self.space.factor_shapes(self.r_max)

    def _rank_problem(self, rank: int) -> str | None:
        if not 1 <= rank <= self.r_max:
            return f"rank {rank} outside [1, r_max={self.r_max}]"
        return None

    def problems(self, update: LoraUpdate) -> list[str]:
        """Every problem with `update` (empty when it can be folded); the server logs these and skips it."""
        problems = []
        n, rank = update.num_samples, update.rank
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            problems.append(f"num_samples must be a positive integer, got {n!r}")
        problems += label_count_problems(update.label_counts, n, self._head_rows)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            return problems + [f"rank must be an integer, got {rank!r}"]
        if (problem := self._rank_problem(int(rank))) is not None:
            return problems + [problem]  # shapes cannot be checked against a rank we refuse
        bases = self._bases(update)
        if not bases:
            problems.append("no LoRA factors: an update adapts at least one weight")
        expected = self.space.factor_shapes(int(rank), bases)
        problems += [f"missing array {k!r}" for k in sorted(set(expected) - set(update.params))]
        problems += [f"unexpected array {k!r}" for k in sorted(set(update.params) - set(expected))]
        for name in sorted(set(expected) & set(update.params)):
            a = update.params[name]
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
                problems.append(f"{name!r}: {getattr(a, 'dtype', type(a).__name__)}, expected a float array")
            elif a.shape != expected[name]:
                problems.append(f"{name!r}: shape {a.shape}, expected {expected[name]} at rank {rank}")
            elif a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
                problems.append(f"{name!r}: contains NaN or Inf")
        return problems

    def _bases(self, update: LoraUpdate) -> list[str]:
        """The adapted weights an update carries factors for (either factor names the weight)."""
        held = {n[: -len(suffix)] for n in update.params for suffix in (LORA_A, LORA_B) if n.endswith(suffix)}
        return [base for base in self.space.adapted if base in held]

    # -- round ------------------------------------------------------------------------------------
    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        shapes = self.global_shapes()
        wrong = sorted(set(shapes) ^ set(global_arrays))
        wrong += [n for n in sorted(set(shapes) & set(global_arrays)) if np.shape(global_arrays[n]) != shapes[n]]
        if wrong:
            raise ValueError(f"global arrays do not match {type(self).__name__}'s state; wrong names or shapes: "
                             f"{wrong} (expected {shapes})")
        self._global = {n: np.array(global_arrays[n], copy=True) for n in shapes}
        self._sums = {n: np.zeros(s) for n, s in shapes.items()}  # float64 sum_n w_n x_n
        self._den = np.zeros(self._head_rows or 1)  # per head row: sum_n w_n (or the label counts)
        self._den_of = dict.fromkeys(self.space.adapted, 0.0)  # per adapted weight, over the clients holding it
        self._clients = self._samples = self._bytes = 0

    def fold(self, update: LoraUpdate) -> None:  # type: ignore[override]  # LoRA updates, not ClientUpdate
        if self._global is None:
            raise RuntimeError("fold() before begin_round()")
        problems = self.problems(update)  # all checks before any sum changes
        if problems:
            raise ValueError(f"update from {update.device_id!r} rejected: " + "; ".join(problems))
        w = float(update.num_samples)
        head_w = np.full(len(self._den), w) if update.label_counts is None else np.asarray(update.label_counts,
                                                                                          dtype=np.float64)
        for name in self.space.head:
            x = update.params[name].astype(np.float64)
            self._sums[name] += per_row(head_w, x.ndim) * x
        for base in self._bases(update):
            self._fold_adapter(base, update.params[base + LORA_A].astype(np.float64),
                               update.params[base + LORA_B].astype(np.float64), int(update.rank), w)
            self._den_of[base] += w
        self._den += head_w
        self._clients += 1
        self._samples += int(update.num_samples)
        self._bytes += sum(a.nbytes for a in update.params.values())

    def _fold_adapter(self, base: str, a: np.ndarray, b: np.ndarray, rank: int, w: float) -> None:
        # zero-padding to r_max = adding into the top `rank` rows of A and columns of B only
        self._sums[base + LORA_A][:rank] += w * a  # [rank, d_in]
        self._sums[base + LORA_B][:, :rank] += w * b  # [d_out, rank]

    def finish(self) -> tuple[dict[str, np.ndarray], RoundStats]:
        if self._global is None:
            raise RuntimeError("finish() before begin_round()")
        new, sq = {}, 0.0
        for name, old in self._global.items():
            if name.startswith(HEAD_PREFIX):  # per row: a row nobody weighted keeps its value
                held = self._den > 0
                agg = old.astype(np.float64)
                agg[held] = self._sums[name][held] / per_row(self._den[held], old.ndim)
            elif (den := self._den_of[name.rsplit(".", 1)[0]]) == 0:  # nobody held it this round: the global stays
                new[name] = old
                continue
            else:
                agg = self._sums[name] / den  # float64
            sq += float(np.sum((agg - old) ** 2))
            new[name] = agg.astype(old.dtype)
        stats = RoundStats(round=self.rounds, clients=self._clients, samples=self._samples,
                           bytes_folded=self._bytes, held_experts={}, usage_share={},
                           pseudo_grad_norm=math.sqrt(sq))
        self.rounds += 1
        self._global = None
        return new, stats

    # -- download ---------------------------------------------------------------------------------
    def _check_view_rank(self, global_arrays: Mapping[str, np.ndarray], rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise ValueError(f"client_view: rank must be an integer, got {rank!r}")
        if (problem := self._rank_problem(int(rank))) is not None:
            raise ValueError(f"client_view: {problem}")
        missing = sorted(set(self.global_shapes()) - set(global_arrays))
        if missing:
            raise ValueError(f"client_view: global arrays lack {missing}")

    def client_view(self, global_arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """The arrays a client at `rank` receives: the top `rank` rows of A and columns of B, and the head."""
        self._check_view_rank(global_arrays, rank)
        out = {n: np.array(global_arrays[n], copy=True) for n in self.space.head}
        for base in self.space.adapted:
            out[base + LORA_A] = np.array(global_arrays[base + LORA_A][:rank], copy=True)  # [rank, d_in]
            out[base + LORA_B] = np.array(global_arrays[base + LORA_B][:, :rank], copy=True)  # [d_out, rank]
        return out

    def client_views(self, global_arrays: Mapping[str, np.ndarray],
                     ranks: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """`client_view` for each distinct rank."""
        return {int(r): self.client_view(global_arrays, r) for r in ranks}

    def initial_global(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state of round 0 from the export's initial factors at r_max (here: those factors)."""
        return dict(init)


class HetLoraStrategy(_LoraStrategy):
    """HetLoRA: zero-pad each client's factors to r_max, sample-weighted average; truncate per client."""


class FedItStrategy(_LoraStrategy):
    """FedIT: every client at the same rank; FedAvg of A and of B (the padding of HetLoRA never happens)."""

    def __init__(self, space: LoraSpace, rank: int):
        super().__init__(space, rank)

    def _rank_problem(self, rank: int) -> str | None:
        return None if rank == self.r_max else f"rank {rank}, FedIT runs every client at rank {self.r_max}"


class FlexLoraStrategy(_LoraStrategy):
    """FlexLoRA: sample-weighted average of the full products B_n A_n; truncated SVD per client rank.

    `init` (the export's initial factors at r_max: A random, B zero) is what a client starts from while
    a product is exactly zero, as before the first round: a zero product has no singular directions
    to hand out, and zero factors could never leave zero.
    """

    def __init__(self, space: LoraSpace, r_max: int, init: Mapping[str, np.ndarray] | None = None):
        super().__init__(space, r_max)
        self.init = dict(init or {})

    def initial_global(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head and, per adapted weight, the product B A of the initial factors (zero: B = 0)."""
        arrays = {n: np.asarray(init[n]) for n in self.space.head}
        for base in self.space.adapted:
            arrays[base + LORA_PRODUCT] = init[base + LORA_B] @ init[base + LORA_A]  # [d_out, d_in]
        return arrays

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """The product `<base>.fftmoe_lora_BA` [d_out, d_in] per adapted weight, and the head."""
        shapes: dict[str, tuple[int, ...]] = {base + LORA_PRODUCT: s for base, s in self.space.adapted.items()}
        shapes.update(self.space.head)
        return shapes

    def _fold_adapter(self, base: str, a: np.ndarray, b: np.ndarray, rank: int, w: float) -> None:
        self._sums[base + LORA_PRODUCT] += (w * b) @ a  # [d_out, rank] @ [rank, d_in] -> [d_out, d_in]

    def client_view(self, global_arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """Factors of the best rank-`rank` approximation of each product (B = U sqrt(S), A = sqrt(S) V^T), and
        the head. One SVD per adapted weight per call: use `client_views` for several ranks."""
        return self.client_views(global_arrays, [rank])[rank]

    def client_views(self, global_arrays: Mapping[str, np.ndarray],
                     ranks: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """`client_view` for each distinct rank, decomposing each product once."""
        for rank in ranks:
            self._check_view_rank(global_arrays, rank)
        views = {int(r): {n: np.array(global_arrays[n], copy=True) for n in self.space.head} for r in ranks}
        for base in self.space.adapted:
            product = global_arrays[base + LORA_PRODUCT]
            if self.init and not np.any(product):  # nothing to decompose yet: the initial factors
                for r, view in views.items():
                    view[base + LORA_A] = np.array(self.init[base + LORA_A][:r], copy=True)  # [r, d_in]
                    view[base + LORA_B] = np.array(self.init[base + LORA_B][:, :r], copy=True)  # [d_out, r]
                continue
            u, s, vt = np.linalg.svd(product.astype(np.float64), full_matrices=False)  # [d_out, k], [k], [k, d_in]
            root = np.sqrt(s)  # [k], k = min(d_out, d_in) >= r_max
            for r, view in views.items():
                view[base + LORA_B] = (u[:, :r] * root[:r]).astype(product.dtype)  # [d_out, r]
                view[base + LORA_A] = (root[:r, None] * vt[:r]).astype(product.dtype)  # [r, d_in]
        return views
