"""The emulation partitioner: loading, the held-out test split, IID and Dirichlet shards, measured label
skew and the per-device CSV files. Synthetic datasets are built in each test; one test reads the
built-in BBC News with the network switched off. No torch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.local_data import load_records
import hw_profiles.partition as partition_module
from hw_profiles.partition import (Dataset, PartitionError, load_dataset, partition, skew, split_test,
                                   write_shards)

CLASSES = ("alpha", "bravo", "charlie", "delta", "echo")


def synthetic(per_class=40, classes=CLASSES) -> Dataset:
    """per_class samples of each class, interleaved so the file order is not grouped by label."""
    texts, labels = [], []
    for i in range(per_class):
        for c in classes:
            texts.append(f"{c} sample {i}")
            labels.append(c)
    return Dataset(texts, labels, tuple(sorted(classes)), "synthetic")


def covers_exactly_once(shards, n):
    flat = np.concatenate(shards)
    return len(flat) == n and np.array_equal(np.sort(flat), np.arange(n))


# ---- loading ---------------------------------------------------------------------------------------

def test_load_csv_and_jsonl_files(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('body,topic\n"x, y",a\nz,b\nw,a\n', encoding="utf-8")
    ds = load_dataset(str(csv_path), text_column="body", label_column="topic")
    assert (ds.texts, ds.labels, ds.label_names, ds.source) == (["x, y", "z", "w"], ["a", "b", "a"], ("a", "b"),
                                                                  str(csv_path))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "p", "label": 2}\n{"text": "q", "label": 10}\n', encoding="utf-8")
    assert load_dataset(str(jsonl)).label_names == ("10", "2")  # sorted as strings


def test_load_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}), path)
    assert load_dataset(str(path)).labels == ["x", "y", "x"]


def test_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(PartitionError, match="bbcnews") as e:
        load_dataset("agnews")
    assert "neither a built-in" in str(e.value)
    with pytest.raises(PartitionError, match="neither"):
        load_dataset(str(tmp_path / "missing.csv"))


def test_one_class_and_bad_files_raise_partition_error(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n", encoding="utf-8")
    with pytest.raises(PartitionError, match="at least 2"):
        load_dataset(str(one))
    bad = tmp_path / "bad.csv"
    bad.write_text("words,label\na,x\n", encoding="utf-8")
    with pytest.raises(PartitionError, match="no text column 'text'"):  # the loader's message, kept
        load_dataset(str(bad))


# ---- the held-out test split -----------------------------------------------------------------------

def test_split_test_is_stratified_disjoint_and_seeded():
    ds = synthetic()
    train, test = split_test(ds, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(200))
    assert Counter(ds.labels[i] for i in test) == {c: 8 for c in CLASSES}
    again = split_test(ds, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, split_test(ds, 0.2, seed=4)[1])
    with pytest.raises(PartitionError):
        split_test(ds, 1.0)


# ---- partitioning ----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(devices=st.integers(1, 12), scheme=st.sampled_from(["iid", "dirichlet"]),
       alpha=st.floats(0.01, 10.0), seed=st.integers(0, 2**32 - 1), min_per_device=st.integers(1, 13))
def test_every_train_sample_in_exactly_one_shard_and_no_test_sample(devices, scheme, alpha, seed, min_per_device):
    ds = synthetic()
    train, test = split_test(ds, 0.2, seed=seed)  # 160 train: 12 x 13 = 156 always fits
    shards = partition([ds.labels[i] for i in train], devices, scheme, alpha, seed, min_per_device)
    assert len(shards) == devices
    assert all(s.dtype == np.int64 for s in shards)
    assert covers_exactly_once(shards, len(train))
    assert min(len(s) for s in shards) >= min_per_device
    seen_by_devices = np.concatenate([train[s] for s in shards])
    assert not np.intersect1d(seen_by_devices, test).size


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(s) for s in partition(["a", "b"] * 51, 4, "iid", seed=1, min_per_device=1)]
    assert sorted(sizes) == [25, 25, 26, 26]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_shards_other_seed_other_shards(scheme):
    labels = synthetic().labels
    a = partition(labels, 6, scheme, 0.5, seed=11)
    b = partition(labels, 6, scheme, 0.5, seed=11)
    c = partition(labels, 6, scheme, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = synthetic(per_class=200).labels  # 1000 samples, 10 devices
    seeds = range(5)

    def mean_over_seeds(scheme, alpha):
        measured = [skew(partition(labels, 10, scheme, alpha, seed=s), labels) for s in seeds]
        return (np.mean([m["mean_tv"] for m in measured]),
                np.mean([m["mean_classes_per_device"] for m in measured]))

    tv_01, classes_01 = mean_over_seeds("dirichlet", 0.1)
    tv_05, classes_05 = mean_over_seeds("dirichlet", 0.5)
    tv_iid, classes_iid = mean_over_seeds("iid", 0.5)
    assert tv_01 > tv_05 > tv_iid
    assert tv_iid < 0.1 and tv_01 > 0.5
    assert classes_01 < classes_05 <= classes_iid == 5


def test_skew_of_known_shards():
    labels = ["a", "a", "b", "b"]
    assert skew([np.array([0, 1]), np.array([2, 3])], labels) == {
        "mean_tv": 0.5, "max_tv": 0.5, "mean_classes_per_device": 1.0, "num_classes": 2}
    assert skew([np.array([0, 2]), np.array([1, 3])], labels)["mean_tv"] == 0.0


@pytest.mark.parametrize("redraws", [1, 100])
def test_min_per_device_is_honoured_by_the_repair_when_redraws_fail(monkeypatch, redraws):
    monkeypatch.setattr(partition_module, "REDRAWS", redraws)  # 1: the repair always runs on the first draw
    labels = synthetic().labels  # 200 samples; 20 devices x 9 = 180, alpha 0.01 puts a class on ~1 device
    shards = partition(labels, 20, "dirichlet", alpha=0.01, seed=0, min_per_device=9)
    assert min(len(s) for s in shards) == 9  # no draw reaches the minimum: the repair stops exactly there
    assert covers_exactly_once(shards, 200)
    again = partition(labels, 20, "dirichlet", alpha=0.01, seed=0, min_per_device=9)
    assert all(np.array_equal(x, y) for x, y in zip(shards, again))
    repaired = skew(shards, labels)
    iid = skew(partition(labels, 20, "iid", seed=0, min_per_device=9), labels)
    assert repaired["mean_tv"] > iid["mean_tv"] + 0.3  # the repair keeps most of the skew
    assert repaired["mean_classes_per_device"] < 2


@pytest.mark.parametrize("kwargs, message", [
    ({"devices": 26}, "needs 208 training samples but there are 200"),
    ({"devices": 5, "min_per_device": 41}, "needs 205"),
    ({"devices": 0}, "devices must be >= 1"),
    ({"devices": 2, "min_per_device": 0}, "min_per_device"),
    ({"devices": 2, "scheme": "shards"}, "unknown partition scheme"),
    ({"devices": 2, "alpha": 0.0}, "alpha"),
    ({"devices": 2, "alpha": float("nan")}, "alpha"),
])
def test_impossible_requests_raise(kwargs, message):
    args = {"scheme": "dirichlet", **kwargs}
    with pytest.raises(PartitionError, match=message):
        partition(synthetic().labels, **args)


# ---- writing the device files ----------------------------------------------------------------------

def test_written_files_round_trip_through_the_device_loader(tmp_path):
    ds = synthetic(per_class=12)
    ds.texts[0] = 'a "quoted", comma\nand a second line — ünïcode'
    train, test = split_test(ds, 0.25, seed=2)
    shards = partition([ds.labels[i] for i in train], 3, "dirichlet", 0.3, seed=2, min_per_device=4)
    names = ["rpi-0", "jetson_1", "laptop.2"]
    paths = write_shards(ds, train, shards, test, tmp_path / "out", names, scheme="dirichlet", alpha=0.3, seed=2)
    assert list(paths) == [*names, "test", "partition"]
    for name, shard in zip(names, shards):
        got = [(r.text, r.label) for r in load_records(paths[name])]
        assert got == [(ds.texts[i], ds.labels[i]) for i in train[shard]]
    assert [(r.text, r.label) for r in load_records(paths["test"])] == [(ds.texts[i], ds.labels[i]) for i in test]
    summary = json.loads(paths["partition"].read_text(encoding="utf-8"))
    assert (summary["scheme"], summary["alpha"], summary["seed"]) == ("dirichlet", 0.3, 2)
    for name, shard in zip(names, shards):
        assert summary["devices"][name]["counts"] == {c: sum(ds.labels[i] == c for i in train[shard])
                                                      for c in ds.label_names}
    assert sum(summary["test"]["counts"].values()) == len(test) == 15
    assert summary["skew"] == skew(shards, [ds.labels[i] for i in train])


@pytest.mark.parametrize("names, message", [
    (["a", "b"], "2 device names for 3 shards"),
    (["a", "test", "c"], "cannot be a file name"),
    (["a", "../b", "c"], "cannot be a file name"),
    (["a", "a", "c"], "unique"),
])
def test_bad_device_names_raise(tmp_path, names, message):
    ds = synthetic(per_class=4)
    train, test = split_test(ds, 0.25)
    shards = partition([ds.labels[i] for i in train], 3, "iid", min_per_device=1)
    with pytest.raises(PartitionError, match=message):
        write_shards(ds, train, shards, test, tmp_path, names)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_overlapping_test_split_is_refused(tmp_path):
    ds = synthetic(per_class=4)
    train = np.arange(20)
    with pytest.raises(PartitionError, match="overlaps"):
        write_shards(ds, train, [train[:10], train[10:]], np.array([3]), tmp_path, ["a", "b"])


# ---- the built-in dataset and the import contract --------------------------------------------------

def test_builtin_bbcnews_loads_offline_and_partitions(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("the built-in dataset must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    ds = load_dataset("bbcnews")
    assert len(ds.texts) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(ds.labels) == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511,
                                  "tech": 401}
    train, test = split_test(ds, 0.2, seed=0)
    assert Counter(ds.labels[i] for i in test) == {"business": 102, "entertainment": 77, "politics": 83,
                                                   "sports": 102, "tech": 80}  # round(0.2 * class size)
    assert len(train) == 2225 - 444
    shards = partition([ds.labels[i] for i in train], 10, "dirichlet", 0.5, seed=0)
    assert covers_exactly_once(shards, 1781)
    paths = write_shards(ds, train, shards, test, tmp_path, [f"dev{i}" for i in range(10)])
    assert len(load_records(paths["dev0"])) == len(shards[0])


def test_importing_the_partitioner_does_not_import_torch():
    code = ("import sys, hw_profiles.partition; "
            "bad = [m for m in ('torch', 'export', 'broker_server') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
