"""Which global experts fill a device's slots each round (docs/METHOD.md "Budgets and tiers").

Default policy: keep the experts this device routed most tokens to last time (`keep` of its
slots, default half rounded up, only experts it actually used) and fill the remaining slots with the globally least-used
experts, counting what was already handed out this round so that devices sampled together cover
the pool instead of all taking the same least-used experts. A device with no history (round 0,
or new) starts at an offset that spreads devices across the pool. Pure functions over numpy;
no transport, no state on disk.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_KEEP = 0.5  # share of a device's slots kept on its most-used experts (METHOD.md: about half)


class SlotPlanner:
    """Assigns slot maps for one round; create one per round and call `assign` per device."""

    def __init__(self, experts: int, usage: dict[int, np.ndarray], keep: float = DEFAULT_KEEP):
        """keep: share of a device's slots given back to the experts it used most last time (rounded up;
        0 = every slot by coverage, so experts change hands each round)."""
        if not 0 <= keep <= 1:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        self.experts, self.keep = experts, keep
        self.usage = {layer: np.asarray(u, dtype=np.float64) for layer, u in usage.items()}
        self.handed_out = {layer: np.zeros(experts) for layer in self.usage}  # [M] slots given this round
        self.fresh = 0  # devices without history assigned so far (for the spreading offset)

    def assign(self, layers: list[int], held: int, history: dict[int, np.ndarray] | None) -> dict[int, list[int]]:
        """Slot map (layer -> `held` distinct global experts) for a device adapting `layers`.

        `history`: per layer, tokens this device routed to each global expert [M] last time it
        trained (None if never).
        """
        if not 1 <= held <= self.experts:
            raise ValueError(f"cannot hold {held} of {self.experts} experts")
        slot_map = {}
        offset = (self.fresh * held) % self.experts
        if history is None:
            self.fresh += 1
        for layer in layers:
            usage = self.usage.get(layer, np.zeros(self.experts))
            given = self.handed_out.setdefault(layer, np.zeros(self.experts))
            if history is None:
                chosen = [(offset + i) % self.experts for i in range(held)]
            else:  # a layer it did not adapt or routed nothing in: nothing to keep, all by coverage
                tokens = np.asarray(history.get(layer, np.zeros(self.experts)), dtype=np.float64)  # [M]
                keep_n = min(math.ceil(held * self.keep - 1e-9), int(np.sum(tokens > 0)))
                keep = [int(e) for e in np.argsort(-tokens, kind="stable")[:keep_n]]
                # least used first; ties broken by what this round already handed out, then index
                order = np.lexsort((np.arange(self.experts), given, usage))
                chosen = keep + [int(e) for e in order if int(e) not in keep][: held - keep_n]
            given[chosen] += 1
            slot_map[layer] = chosen
        return slot_map


def tokens_by_global_expert(slot_map: dict[int, list[int]], expert_tokens: dict[int, np.ndarray],
                            experts: int) -> dict[int, np.ndarray]:
    """A device's per-slot token counts re-indexed by global expert: layer -> [M]."""
    out = {}
    for layer, slots in slot_map.items():
        counts = np.zeros(experts)
        counts[list(slots)] = np.asarray(expert_tokens[layer], dtype=np.float64)
        out[layer] = counts
    return out
