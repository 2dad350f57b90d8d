"""Structural and value checks of one client update against its tier, before it reaches a strategy.

`validate_update` lists every problem (names, shapes, dtypes, NaN / Inf, sample and label counts,
slot map, token counts) so the server can reject an update with all its reasons at once. It folds
nothing and knows no transport; the exact-aggregation range (exact_sums.py) is checked where values
are staged. `head_rows` and `label_count_problems` serve the LoRA strategies too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

from edge_runtime.manifest import layer_of
from edge_runtime.wire.fields import all_finite

if TYPE_CHECKING:
    from broker_server.aggregation import ClientUpdate

_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def validate_update(update: ClientUpdate, expected: Mapping[str, tuple[int, ...]], experts: int) -> list[str]:
    """Every problem with `update` against the tier's expected names/shapes and M global experts."""
    problems = []
    if not isinstance(update.device_id, str) or not update.device_id:
        problems.append("device_id must be a non-empty string")
    for name in sorted(set(expected) - set(update.params)):
        problems.append(f"missing array {name!r}")
    for name in sorted(set(update.params) - set(expected)):
        problems.append(f"unexpected array {name!r}")
    for name in sorted(set(expected) & set(update.params)):
        a = update.params[name]
        if not isinstance(a, np.ndarray) or a.dtype not in _FLOATS:
            problems.append(f"{name!r}: dtype {getattr(a, 'dtype', type(a).__name__)}, expected float32 or float16")
            continue
        if a.shape != tuple(expected[name]):
            problems.append(f"{name!r}: shape {a.shape}, expected {tuple(expected[name])}")
        if not all_finite(a):
            problems.append(f"{name!r}: contains NaN or Inf")
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        problems.append(f"num_samples must be a positive integer, got {n!r}")
    if update.label_counts is not None:
        head = head_rows(shape for name, shape in expected.items() if layer_of(name) is None)
        problems += label_count_problems(update.label_counts, n, head)
    slots_of = {layer_of(name): shape[0] for name, shape in expected.items() if layer_of(name) is not None}
    for what, given in (("slot_map", update.slot_map), ("expert_tokens", update.expert_tokens)):
        if set(given) != set(slots_of):
            problems.append(f"{what} layers {sorted(given)}, expected {sorted(slots_of)}")
    for layer, m_t in sorted(slots_of.items()):
        slots = update.slot_map.get(layer)
        if slots is not None:
            if len(slots) != m_t:
                problems.append(f"slot_map[{layer}] has {len(slots)} entries, expected {m_t}")
            ints = all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in slots)
            if not ints or not all(0 <= g < experts for g in slots):
                problems.append(f"slot_map[{layer}] = {list(slots)}: entries must be integers in [0, {experts})")
            elif len(set(slots)) != len(slots):
                problems.append(f"slot_map[{layer}] = {list(slots)} has duplicates")
        tokens = update.expert_tokens.get(layer)
        if tokens is not None:
            t = np.asarray(tokens)
            if t.shape != (m_t,) or t.dtype.kind not in "iuf":
                problems.append(f"expert_tokens[{layer}]: shape {t.shape} dtype {t.dtype}, expected ({m_t},) numbers")
            elif not np.all(np.isfinite(t)) or np.any(t < 0):
                problems.append(f"expert_tokens[{layer}] must be finite and >= 0")
    return problems


def head_rows(shapes: Iterable[tuple[int, ...]]) -> int | None:
    """C, the labels: the axis-0 length every head array shares (None: no head, or the lengths differ)."""
    rows = {tuple(shape)[:1] for shape in shapes}
    return rows.pop()[0] if len(rows) == 1 and () not in rows else None


def label_count_problems(counts, num_samples, head_rows: int | None) -> list[str]:
    """Problems with an update's samples per label (None: it reported none): one non-negative integer
    per head row, summing to num_samples (the weight the rest of the update carries)."""
    if counts is None:
        return []
    c = np.asarray(counts)
    if head_rows is None or c.shape != (head_rows,):
        return [f"label_counts: shape {c.shape}, expected one count per head row ({head_rows})"]
    if c.dtype.kind not in "iuf" or not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c != np.floor(c)):
        return ["label_counts must be integers >= 0"]
    if c.sum() != num_samples:
        return [f"label_counts sum to {c.sum():g}, not num_samples {num_samples!r}"]
    return []
