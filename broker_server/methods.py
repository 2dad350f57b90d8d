"""What a round does that depends on the adapter method: FFT-MoE, or one of the LoRA baselines.

The server (`server.py`) runs the same rounds, transport and durable state for every method; a
`RoundMethod` supplies the rest: the global arrays it starts from, what a task carries (slot maps
and heterogeneity targets for FFT-MoE; rank-truncated factors for LoRA), how an Update becomes a
strategy update and is validated, and what usage statistics there are. FFT-MoE wraps
`aggregation.FftMoeStrategy` with the slot planner (METHOD.md "Budgets and tiers"); the baselines
wrap `lora_strategies` (METHOD.md "Baselines"). No MQTT and no disk here.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from broker_server.aggregation import AggregationConfig, ClientUpdate, FftMoeStrategy, ParamSpace, het_target
from broker_server.update_checks import validate_update
from broker_server.lora_strategies import FedItStrategy, FlexLoraStrategy, HetLoraStrategy, LoraSpace, LoraUpdate
from broker_server.slots import DEFAULT_KEEP, SlotPlanner, tokens_by_global_expert
from edge_runtime import wire
from edge_runtime.manifest import Manifest, TierEntry

METHODS = ("fft-moe", "fedit", "hetlora", "flexlora")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


class MethodError(ValueError):
    """The method does not fit the export (e.g. a LoRA baseline on FFT-MoE artifacts)."""


class MoeMethod:
    """FFT-MoE: slot maps from the planner, per-slot global arrays, q targets from the usage EMA."""

    method = "fft-moe"

    def __init__(self, manifest: Manifest, config: AggregationConfig, gamma: float, slot_keep: float = DEFAULT_KEEP):
        if manifest.is_lora:
            raise MethodError(f"{manifest.root} is a LoRA export; FFT-MoE needs `fftmoe export` without --method lora")
        self.manifest, self.gamma, self.slot_keep = manifest, gamma, slot_keep
        self.space = ParamSpace(manifest.global_params)
        self.strategy = FftMoeStrategy(self.space, config)
        self.planner: SlotPlanner | None = None  # the current round's, made by begin_round

    def initial_global(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(init)

    def usage(self) -> dict[str, list[float]]:
        """The fleet's expert usage EMA: layer -> share per global expert."""
        return {str(k): v.tolist() for k, v in self.strategy.usage.items()}

    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.planner = SlotPlanner(self.space.experts, self.strategy.usage, keep=self.slot_keep)
        self.strategy.begin_round(global_arrays)

    def task_fields(self, tier: TierEntry, history, global_arrays) -> tuple[dict, dict[int, list[int]], dict]:
        """(params, slot_map, het_target) of one device's task."""
        slot_map = self.planner.assign(list(tier.adapted_layers), tier.experts_held, history)
        params = self.space.gather_slots(global_arrays, slot_map)
        target = {str(layer): het_target(self.strategy.usage[layer], slots, gamma=self.gamma).tolist()
                  for layer, slots in slot_map.items()}
        return params, slot_map, target

    def to_update(self, message: wire.Update, slot_map: dict[int, list[int]], tier: TierEntry) -> ClientUpdate:
        return client_update(message, slot_map)

    def problems(self, update: ClientUpdate, tier: TierEntry) -> list[str]:
        expected = self.space.tier_shapes(list(tier.adapted_layers), tier.experts_held)
        return validate_update(update, expected, self.space.experts)

    def history(self, update: ClientUpdate) -> dict[int, np.ndarray]:
        """Tokens per global expert of this update: the device's history for the next slot plan."""
        return tokens_by_global_expert(update.slot_map, update.expert_tokens, self.space.experts)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.strategy.optimizer_state()

    def serving_arrays(self, global_arrays: Mapping[str, np.ndarray], tier: TierEntry) -> dict[str, np.ndarray]:
        """What a deployed model of `tier` runs with: per layer the experts the fleet used most (all of them
        when the tier holds M), in global order."""
        arrays = {}
        for p in tier.params:
            value = global_arrays[p.name]
            if p.slot_axis is not None:
                share = self.strategy.usage[p.layer]  # [M]
                value = value[sorted(np.argsort(-share, kind="stable")[: tier.experts_held].tolist())]
            arrays[p.name] = value
        return arrays

    def load_state(self, optimizer: Mapping[str, np.ndarray], usage: Mapping) -> None:
        if optimizer:
            self.strategy.load_optimizer_state(optimizer)
        self.strategy.load_usage(usage)


class LoraMethod:
    """A LoRA baseline: FedIT, HetLoRA or FlexLoRA on a `fftmoe export --method lora` folder.

    Tasks carry the tier's factors at its rank (`client_views`), only for the weights the tier adapts.
    FlexLoRA gets the export's initial factors for the rounds before its products have any direction.
    """

    def __init__(self, method: str, manifest: Manifest):
        if not manifest.is_lora:
            raise MethodError(f"{manifest.root} is an FFT-MoE export; {method} needs `fftmoe export --method lora`")
        self.method, self.manifest = method, manifest
        self.space, r_max = LoraSpace.from_factor_shapes({p.name: p.shape for p in manifest.global_params})
        self.ranks = sorted({t.rank for t in manifest.tiers.values()})
        if method == "fedit":
            if len(self.ranks) != 1:
                raise MethodError(f"FedIT runs every client at one rank, but {manifest.root} has tier ranks "
                                  f"{self.ranks}; export with `fftmoe export --method lora --lora-rank R`")
            self.strategy = FedItStrategy(self.space, r_max)
        elif method == "hetlora":
            self.strategy = HetLoraStrategy(self.space, r_max)
        else:
            with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as data:
                init = {n: data[n] for n in data.files}
            self.strategy = FlexLoraStrategy(self.space, r_max, init=init)
        self._views: dict[int, dict[str, np.ndarray]] = {}

    def initial_global(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.strategy.initial_global(init)

    def usage(self) -> dict[str, list[float]]:
        return {}  # no experts, no routing

    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.strategy.begin_round(global_arrays)
        self._views = self.strategy.client_views(global_arrays, self.ranks)  # rank -> what a client starts from

    def task_fields(self, tier: TierEntry, history, global_arrays) -> tuple[dict, dict, dict]:
        view = self._views[tier.rank]
        return {p.name: view[p.name] for p in tier.params}, {}, {}

    def to_update(self, message: wire.Update, slot_map, tier: TierEntry) -> LoraUpdate:
        return LoraUpdate(device_id=message.device_id,
                          params={k: v.astype(np.float32, copy=False) for k, v in message.params.items()},
                          num_samples=message.num_samples, rank=tier.rank, label_counts=label_counts(message))

    def problems(self, update: LoraUpdate, tier: TierEntry) -> list[str]:
        expected = {p.name for p in tier.params}
        problems = [f"missing array {n!r}" for n in sorted(expected - set(update.params))]
        problems += [f"unexpected array {n!r}" for n in sorted(set(update.params) - expected)]
        problems += [f"{n!r}: dtype {a.dtype}, expected float32 or float16" for n, a in sorted(update.params.items())
                     if a.dtype not in _FLOATS]
        return problems or self.strategy.problems(update)

    def history(self, update: LoraUpdate) -> None:
        return None

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {}  # FedAvg: nothing beyond the global arrays

    def serving_arrays(self, global_arrays: Mapping[str, np.ndarray], tier: TierEntry) -> dict[str, np.ndarray]:
        """What a deployed model of `tier` runs with: its rank's view of the global factors (FlexLoRA: the
        best rank-r approximation of the averaged products)."""
        view = self.strategy.client_view(global_arrays, tier.rank)
        return {p.name: view[p.name] for p in tier.params}

    def load_state(self, optimizer: Mapping[str, np.ndarray], usage: Mapping) -> None:
        if optimizer:
            raise MethodError(f"the state folder holds server-optimiser state, which {self.method} never writes: "
                              "it belongs to an FFT-MoE run; use a new --state-dir")


def client_update(message: wire.Update, slot_map: dict[int, list[int]]) -> ClientUpdate:
    """An FFT-MoE Update as the strategy folds it: float32 arrays, float64 token counts, and the slot
    map the server handed the device (the update itself does not carry it)."""
    return ClientUpdate(device_id=message.device_id,
                        params={k: v.astype(np.float32, copy=False) for k, v in message.params.items()},
                        slot_map=slot_map, num_samples=message.num_samples,
                        expert_tokens={int(k): np.asarray(v, dtype=np.float64) for k, v in message.expert_tokens.items()},
                        label_counts=label_counts(message))


def label_counts(message: wire.Update) -> np.ndarray | None:
    """The update's samples per label as a float64 vector, or None when it reported none."""
    return np.asarray(message.label_counts, dtype=np.float64) if message.label_counts else None


def make_method(name: str, manifest: Manifest, config: AggregationConfig, gamma: float,
                slot_keep: float = DEFAULT_KEEP) -> MoeMethod | LoraMethod:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return MoeMethod(manifest, config, gamma, slot_keep) if name == "fft-moe" else LoraMethod(name, manifest)
