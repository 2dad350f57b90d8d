"""Splits one labelled text dataset across N emulated devices (IID or Dirichlet over labels) for `fftmoe run`.

Loads a built-in dataset or a CSV / JSON Lines / Parquet file, holds out a stratified global test split
that no device sees, partitions the rest (Dirichlet: Hsu et al. 2019, as in FedLab), measures the label
skew and writes one CSV per device, as a real device would hold its data. Everything is seeded numpy.
It is not the device-side loader (`edge_runtime.local_data`), a trainer, or anything that imports torch.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.builtin_data import BUILTIN, DatasetError, builtin_labels, builtin_samples
from edge_runtime.local_data import LocalDataError, load_records, split_holdout

SCHEMES = ("iid", "dirichlet")
REDRAWS = 100  # Dirichlet attempts before the deterministic repair
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED = {"test", "partition"}  # would collide with test.csv / partition.json


class PartitionError(ValueError):
    """A dataset cannot be loaded or split as asked; the message says why and what to change."""


@dataclass(frozen=True)
class Dataset:
    """A labelled text dataset held in memory, in a stable order (indices below point into it)."""

    texts: list[str]
    labels: list[str]  # one per text
    label_names: tuple[str, ...]  # sorted unique labels
    source: str  # the built-in name or the file path

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise PartitionError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")


def load_dataset(spec: str, text_column: str = "text", label_column: str = "label") -> Dataset:
    """A built-in dataset by name ("bbcnews") or a CSV / JSONL / Parquet file with at least 2 classes."""
    try:
        if spec in BUILTIN:
            samples = builtin_samples(spec)
            texts, labels, names = [t for t, _ in samples], [y for _, y in samples], builtin_labels(spec)
        elif Path(spec).is_file():
            records = load_records(spec, text_column, label_column)
            texts, labels = [r.text for r in records], [r.label for r in records]
            names = tuple(sorted(set(labels)))
        else:
            raise PartitionError(f"{spec!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                                 "nor an existing CSV / JSON Lines / Parquet file")
    except (DatasetError, LocalDataError) as e:
        raise PartitionError(str(e)) from None
    present = set(labels)
    if len(present) < 2:
        raise PartitionError(f"{spec}: {len(present)} class(es) ({', '.join(sorted(present)) or 'no data'}); "
                             "a classification dataset needs at least 2")
    return Dataset(texts, labels, tuple(n for n in names if n in present), str(spec))


def _class_ids(labels: Sequence[str]) -> np.ndarray:
    """Labels as class indices [N] in sorted label order, so draws do not depend on file order of classes."""
    _, ids = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return ids.astype(np.int64).reshape(-1)


def split_test(dataset: Dataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, test_indices) into the dataset, sorted int64, stratified by label, same seed same split.

    Each class sends round(test_fraction * size) samples to test and keeps at least one for training.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise PartitionError(f"test fraction must be in [0, 1), got {test_fraction}")
    return split_holdout(len(dataset.labels), test_fraction, seed, _class_ids(dataset.labels))


def _dirichlet_draw(class_ids: np.ndarray, devices: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One draw: each class's shuffled samples cut by proportions p_c ~ Dir(alpha * 1_devices)."""
    shards: list[list[int]] = [[] for _ in range(devices)]
    for c in range(int(class_ids.max()) + 1):
        members = rng.permutation(np.flatnonzero(class_ids == c))
        p = rng.dirichlet(np.full(devices, alpha))  # [devices]
        cuts = (np.cumsum(p) * len(members)).astype(np.int64)[:-1]  # devices-1 cut points into members
        for shard, part in zip(shards, np.split(members, cuts)):
            shard.extend(part.tolist())
    return shards


def _repair(shards: list[list[int]], class_ids: np.ndarray, min_per_device: int) -> None:
    """Fills the smallest shard from the largest, repeatedly, until every shard has the minimum.

    Each move takes as much of the receiver's deficit as the donor can spare, preferring samples of
    the class the receiver already holds most of (else the donor's last ones, which share a class as
    shards are grouped by class), so the repair keeps as much label skew as it can. Deterministic;
    it ends because the caller checked devices * min_per_device <= samples: while one shard is
    short, another has a surplus.
    """
    while True:
        sizes = [len(s) for s in shards]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= min_per_device:
            return
        donor, receiver = shards[large], shards[small]
        k = min(min_per_device - sizes[small], sizes[large] - min_per_device)
        wanted = int(np.bincount(class_ids[receiver]).argmax()) if receiver else -1
        # positions in the donor: matching class first, then from the end of the list
        order = sorted(range(len(donor)), key=lambda j: (class_ids[donor[j]] != wanted, -j))[:k]
        moved = set(order)
        receiver.extend(donor[j] for j in order)
        shards[large] = [x for j, x in enumerate(donor) if j not in moved]


def partition(labels_of_train: Sequence[str], devices: int, scheme: str, alpha: float = 0.5, seed: int = 0,
              min_per_device: int = 8) -> list[np.ndarray]:
    """Shards of indices into the train set, one int64 array per device, each in a seeded shuffled order.

    Every train sample lands in exactly one shard. "iid": a shuffled split into sizes that differ by at
    most one. "dirichlet": per class, p_c ~ Dir(alpha * 1_devices) splits that class across devices
    (smaller alpha, more skew); redrawn up to REDRAWS times until every device has `min_per_device`
    samples, then repaired by moving samples off the largest shards.
    """
    n = len(labels_of_train)
    if devices < 1:
        raise PartitionError(f"devices must be >= 1, got {devices}")
    if min_per_device < 1:
        raise PartitionError(f"min_per_device must be >= 1 (a device with no data cannot train), got {min_per_device}")
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "dirichlet" and not (np.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"Dirichlet alpha must be a positive number, got {alpha}")
    if devices * min_per_device > n:
        raise PartitionError(f"{devices} devices x {min_per_device} samples each needs {devices * min_per_device} "
                             f"training samples but there are {n}; use fewer devices or a smaller minimum")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [shard.astype(np.int64) for shard in np.array_split(rng.permutation(n), devices)]
    class_ids = _class_ids(labels_of_train)
    shards = _dirichlet_draw(class_ids, devices, alpha, rng)
    for _ in range(REDRAWS - 1):
        if min(len(s) for s in shards) >= min_per_device:
            break
        shards = _dirichlet_draw(class_ids, devices, alpha, rng)
    _repair(shards, class_ids, min_per_device)  # a no-op when the draw already satisfies the minimum
    # within a shard samples are grouped by class; shuffle so a file's first rows are not all one label
    return [rng.permutation(np.asarray(s, dtype=np.int64)) for s in shards]


def skew(shards: Sequence[np.ndarray], labels: Sequence[str]) -> dict:
    """Measured label skew of shards of indices into `labels` (the train labels).

    mean_tv / max_tv: total-variation distance between each shard's label distribution and that of
    all shards together (0 = identical, 1 = disjoint); mean_classes_per_device: labels present per shard.
    """
    class_ids = _class_ids(labels)
    num_classes = int(class_ids.max()) + 1 if len(class_ids) else 0
    counts = np.stack([np.bincount(class_ids[np.asarray(s, dtype=np.int64)], minlength=num_classes)
                       for s in shards]).astype(np.float64)  # [devices, C]
    sizes = counts.sum(axis=1)  # [devices]
    global_p = counts.sum(axis=0) / max(counts.sum(), 1.0)  # [C]
    nonempty = sizes > 0
    shard_p = counts[nonempty] / sizes[nonempty, None]  # [devices', C]
    tv = 0.5 * np.abs(shard_p - global_p[None, :]).sum(axis=1)  # [devices']
    return {"mean_tv": float(tv.mean()) if len(tv) else 0.0, "max_tv": float(tv.max()) if len(tv) else 0.0,
            "mean_classes_per_device": float((counts > 0).sum(axis=1).mean()), "num_classes": num_classes}


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """A `text,label` CSV: the file format every device shard and test split is written in."""
    with path.open("w", encoding="utf-8", newline="") as f:  # newline="": csv quotes embedded newlines itself
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _counts(dataset: Dataset, rows: np.ndarray) -> dict[str, int]:
    counts = dict.fromkeys(dataset.label_names, 0)
    for i in rows:
        counts[dataset.labels[i]] += 1
    return counts


def write_shards(dataset: Dataset, train_idx: np.ndarray, shards: Sequence[np.ndarray], test_idx: np.ndarray,
                 out_dir: str | Path, names: list[str], *, scheme: str | None = None, alpha: float | None = None,
                 seed: int | None = None) -> dict[str, Path]:
    """Writes `{name}.csv` per device, `test.csv` and `partition.json` into out_dir; returns their paths.

    `shards` index into `train_idx`, which indexes the dataset. The CSVs have columns text,label (UTF-8)
    and load with `edge_runtime.local_data.load_records`. The returned dict maps each device name, then
    "test" and "partition", to its path. scheme/alpha/seed are recorded in partition.json as given.
    """
    train_idx, test_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(test_idx, dtype=np.int64)
    if len(names) != len(shards):
        raise PartitionError(f"{len(names)} device names for {len(shards)} shards")
    for name in names:
        if not _NAME.fullmatch(name) or name in _RESERVED:
            raise PartitionError(f"device name {name!r} cannot be a file name here: use letters, digits, '_', "
                                 f"'-', '.', not starting with '.' or '-', and not {' or '.join(sorted(_RESERVED))}")
    if len(set(names)) != len(names):
        raise PartitionError(f"device names must be unique, got {names}")
    shards = [np.asarray(s, dtype=np.int64) for s in shards]
    if any(s.size and (s.min() < 0 or s.max() >= len(train_idx)) for s in shards):
        raise PartitionError(f"shard indices must index the {len(train_idx)} training samples")
    rows_per_device = [train_idx[s] for s in shards]
    if np.intersect1d(train_idx, test_idx).size:
        raise PartitionError("the test split overlaps the training samples; no device may see test data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in zip(names, rows_per_device):
        paths[name] = out / f"{name}.csv"
        write_csv(paths[name], [(dataset.texts[i], dataset.labels[i]) for i in rows])
    paths["test"] = out / "test.csv"
    write_csv(paths["test"], [(dataset.texts[i], dataset.labels[i]) for i in test_idx])
    train_labels = [dataset.labels[i] for i in train_idx]
    summary = {
        "source": dataset.source, "scheme": scheme, "alpha": alpha, "seed": seed,
        "labels": list(dataset.label_names),
        "devices": {name: {"file": paths[name].name, "samples": len(rows), "counts": _counts(dataset, rows)}
                    for name, rows in zip(names, rows_per_device)},
        "test": {"file": paths["test"].name, "samples": len(test_idx), "counts": _counts(dataset, test_idx)},
        "skew": skew(shards, train_labels),
    }
    paths["partition"] = out / "partition.json"
    paths["partition"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths
