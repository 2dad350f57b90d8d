"""The label histogram a device reports when its task asks (`RoundTask.report_label_counts`): exact, or
released once under local differential privacy.

A server that weights each head row by the devices' samples of its label (`head_weighting = "labels"`)
asks every device for its training samples per label. With `label_count_epsilon` unset the device
sends the exact counts. With it set, the device releases its histogram through the discrete Laplace
(two-sided geometric) mechanism: each count gets integer noise with P(k) proportional to
exp(-epsilon |k| / 2). Changing the label of one training sample moves two counts by one (L1
sensitivity 2), so the release is epsilon-differentially private for every single sample's label.
What follows the noise is post-processing and keeps the guarantee: clip at zero, rescale to
`num_samples` (which every update sends anyway) and round by largest remainder, so the counts still
sum to num_samples as the server checks (`broker_server.update_checks.label_count_problems`).

The noisy histogram is drawn once and kept in the state folder (`label_counts.json`): answering each
round with fresh noise would let the server average it away (R answers cost R x epsilon), while
repeating one draw costs epsilon for the life of the data. A new draw happens only when the local
counts or epsilon change. Noise comes from the OS entropy pool, never from the device's seed, which
an operator may know.

What this is not: it does not hide the label skew itself (that is what the server weights by), and
it says nothing about what the trained arrays of an update reveal (a head row that comes back
unchanged under `own_labels_only` shows a missing label; see docs/METHOD.md, "Aggregation").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edge_runtime.local_state import StateFileError, atomic_write_bytes

RELEASE_FILE = "label_counts.json"
SENSITIVITY = 2  # L1 change of a histogram when one sample's label changes


def discrete_laplace(shape, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Integer noise with P(k) proportional to exp(-epsilon |k| / SENSITIVITY): the difference of two
    geometric variables with success probability 1 - exp(-epsilon / SENSITIVITY)."""
    if not epsilon > 0 or math.isinf(epsilon):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    p = -math.expm1(-epsilon / SENSITIVITY)
    return rng.geometric(p, shape).astype(np.int64) - rng.geometric(p, shape).astype(np.int64)


def to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers proportional to `values` (clipped at zero) that sum to `total`, by largest
    remainder; all-zero values spread `total` evenly."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    if v.sum() <= 0:
        v = np.ones_like(v)
    share = v * (total / v.sum())
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    return counts


def private_histogram(counts, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """One epsilon-DP release of `counts` that still sums to `sum(counts)`."""
    exact = np.asarray(counts, dtype=np.int64)
    rng = np.random.default_rng() if rng is None else rng  # OS entropy
    return to_total(exact + discrete_laplace(exact.shape, epsilon, rng), int(exact.sum()))


def reported_counts(counts, epsilon: float | None, state_dir: str | Path) -> list[int]:
    """The label counts this device sends: exact when `epsilon` is None, else its one saved private
    release of these exact counts at this epsilon (made and saved on first use)."""
    exact = [int(c) for c in counts]
    if epsilon is None:
        return exact
    path = Path(state_dir) / RELEASE_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["exact"] == exact and saved["epsilon"] == epsilon:
                return [int(c) for c in saved["released"]]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise StateFileError(f"label count release {path} is corrupt ({err}); move it away to draw a new "
                                 "one (each new draw spends the privacy budget again)") from err
    released = [int(c) for c in private_histogram(exact, epsilon)]
    record = {"epsilon": epsilon, "exact": exact, "released": released}
    atomic_write_bytes(path, (json.dumps(record) + "\n").encode())
    return released


__all__ = ["RELEASE_FILE", "discrete_laplace", "private_histogram", "reported_counts", "to_total"]
