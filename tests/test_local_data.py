"""Local data files: reading each format, error messages a device owner can act on, the stratified
holdout split, tokenisation with a tokenizer.json, and batching. No torch, no model: the tiny
WordPiece tokenizer from `tests.tiny_model` is written to a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.local_data import (LocalDataError, LocalDataset, Record, TextEncoder, encode_labels, load_records,
                                     split_holdout)
from tests.tiny_model import LABELS, write_tokenizer

PAD, UNK, CLS, SEP = 0, 1, 2, 3


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_tokenizer(path)
    return path


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding, newline="")
    return path


def write_jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- reading each format -------------------------------------------------------------------------

def test_csv_round_trip_with_quoted_commas_newlines_and_bom(tmp_path):
    path = write(tmp_path / "d.csv", '\ufefftext,label\n'
                                     '"the market, the bank",business\n'
                                     '"a film\nwith two lines",entertainment\n'
                                     '\n'
                                     'the vote,politics\n')
    assert load_records(path) == [("the market, the bank", "business", 2),
                                  ("a film\nwith two lines", "entertainment", 3),
                                  ("the vote", "politics", 6)]  # a record's line is where it starts


def test_jsonl_round_trip_ignores_blank_lines_and_reads_int_labels(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "the match", "label": "sport"}\n\n   \n'
                                       '{"text": "a phone", "label": 4}\n')
    records = load_records(path)
    assert records == [("the match", "sport", 1), ("a phone", "4", 4)]
    assert isinstance(records[0], Record) and records[1].label == "4"


@pytest.mark.parametrize("suffix", [".ndjson", ".json-lines", ".JSONL"])
def test_jsonl_extensions(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"d{suffix}", [{"text": "the cup", "label": "sport"}])
    assert load_records(path) == [("the cup", "sport", 1)]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["the team won", "new software"], "y": [3, 4], "extra": [1.0, 2.0]}), path)
    assert load_records(path, "body", "y") == [("the team won", "3", 1), ("new software", "4", 2)]
    missing = r"d\.parquet: no text column 'text'; columns present: 'body', 'y', 'extra'"
    with pytest.raises(LocalDataError, match=missing):
        load_records(path)
    pq.write_table(pa.table({"text": ["ok", None], "label": ["a", "b"]}), path)
    with pytest.raises(LocalDataError, match=r"d\.parquet, row 2: text column 'text' is missing \(null\)"):
        load_records(path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path / "d.parquet", "not really parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LocalDataError, match=r"d\.parquet: .*pip install pyarrow"):
        load_records(path)


def test_custom_column_names(tmp_path):
    csv_path = write(tmp_path / "d.csv", "id,body,category\n7,the goal,sport\n")
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", [{"body": "the goal", "category": "sport", "id": 7}])
    assert load_records(csv_path, text_column="body", label_column="category") == [("the goal", "sport", 2)]
    assert load_records(jsonl_path, text_column="body", label_column="category") == [("the goal", "sport", 1)]


# ---- error messages name the file and the line or row ----------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "body,label\nx,sport\n", r"d\.csv: no text column 'text'; columns present: 'body', 'label'"),
    ("d.csv", "text,cat\nx,sport\n", r"d\.csv: no label column 'label'; columns present: 'text', 'cat'"),
    ("d.csv", "text,label\nthe cup,sport\n  ,sport\n", r"d\.csv, line 3: text column 'text' is empty"),
    ("d.csv", "text,label\nthe cup,sport\nthe vote,\n", r"d\.csv, line 3: label column 'label' is missing or empty"),
    ("d.csv", "text,label\nthe cup, a team,sport\n", r"d\.csv, line 2: 3 fields but the header has 2"),
    ("d.csv", "text,label\nthe cup\n", r"d\.csv, line 2: 1 fields but the header has 2"),
    ("d.csv", "", r"d\.csv: the file is empty"),
    ("d.csv", "text,label\n", r"d\.csv: the file has no data rows"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r"d\.jsonl, line 2: malformed JSON"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n["b", "x"]\n', r"d\.jsonl, line 2: expected a JSON object, got list"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": 5, "label": "x"}\n',
     r"d\.jsonl, line 2: text column 'text' must be a string, got int"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "", "label": "x"}\n',
     r"d\.jsonl, line 2: text column 'text' is empty"),
    ("d.jsonl", '{"text": "a", "label": null}\n', r"d\.jsonl, line 1: label column 'label' is missing or empty"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n',
     r"d\.jsonl, line 1: label column 'label' must be a string or an integer"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"body": "b", "label": "x"}\n',
     r"d\.jsonl, line 2: no text column 'text'; columns present: 'body', 'label'"),
    ("d.jsonl", "\n\n", r"d\.jsonl: the file has no data rows"),
    ("d.txt", "text,label\n", r"d\.txt: unsupported file type '\.txt'; use one of \.csv, \.jsonl"),
    ("d", "text,label\n", r"unsupported file type '\(no extension\)'"),
])
def test_error_messages_name_file_and_row(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(LocalDataError, match=message):
        load_records(path)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(LocalDataError, match=r"nope\.csv: no such file"):
        load_records(tmp_path / "nope.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(LocalDataError, match=r"latin\.csv: not UTF-8"):
        load_records(path)


def test_local_data_error_is_a_value_error():
    assert issubclass(LocalDataError, ValueError)


def test_encode_labels_maps_through_manifest_order(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,tech\nb,business\nc,sport\n")
    labels = encode_labels(load_records(path), LABELS, path)
    assert labels.dtype == np.int64 and labels.tolist() == [4, 0, 3]


def test_encode_labels_compares_int_labels_as_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "0"}])
    assert encode_labels(load_records(path), ("0", "1"), path).tolist() == [1, 0]


def test_unknown_label_names_file_row_label_and_known_labels(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,tech\nb,weather\n")
    with pytest.raises(LocalDataError, match=r"d\.csv, line 3: unknown label 'weather'; the model's labels are: "
                                             r"'business', 'entertainment', 'politics', 'sport', 'tech'"):
        encode_labels(load_records(path), LABELS, path)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "tech"}, {"text": "b", "label": "Tech"}])
    with pytest.raises(LocalDataError, match=r"d\.jsonl, line 2: unknown label 'Tech'"):
        encode_labels(load_records(jsonl), LABELS, jsonl)


# ---- stratified holdout split --------------------------------------------------------------------

def test_split_is_stratified_per_class():
    labels = np.repeat(np.arange(3), [50, 20, 10])
    train, holdout = split_holdout(len(labels), 0.2, seed=0, labels=labels)
    assert np.bincount(labels[holdout], minlength=3).tolist() == [10, 4, 2]
    assert np.bincount(labels[train], minlength=3).tolist() == [40, 16, 8]


def test_split_is_deterministic_and_depends_on_seed():
    labels = np.repeat(np.arange(4), 25)
    a = split_holdout(100, 0.3, seed=1, labels=labels)
    b = split_holdout(100, 0.3, seed=1, labels=labels)
    c = split_holdout(100, 0.3, seed=2, labels=labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_split_keeps_one_train_sample_per_class_and_allows_empty_holdout():
    labels = np.array([0, 0, 1, 2, 2, 2])
    train, holdout = split_holdout(6, 0.9, seed=0, labels=labels)
    assert set(labels[train].tolist()) == {0, 1, 2}  # the singleton and each pair keep a train sample
    train, holdout = split_holdout(6, 0.0, seed=0, labels=labels)
    assert holdout.size == 0 and train.tolist() == list(range(6))
    with pytest.raises(ValueError, match="holdout fraction"):
        split_holdout(6, 1.0, seed=0)


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60), fraction=st.floats(0.0, 0.95),
       seed=st.integers(0, 2**31), stratify=st.booleans())
def test_split_partitions_every_index(labels, fraction, seed, stratify):
    labels = np.array(labels)
    train, holdout = split_holdout(len(labels), fraction, seed, labels if stratify else None)
    assert train.dtype == holdout.dtype == np.int64
    assert np.intersect1d(train, holdout).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, holdout])), np.arange(len(labels)))
    groups = [labels] if not stratify else [labels[labels == c] for c in np.unique(labels)]
    for members in groups:  # ~fraction of each class held out, never a whole class of two or more
        n_hold = np.isin(holdout, np.flatnonzero(labels == members[0])).sum() if stratify else holdout.size
        assert abs(n_hold - fraction * len(members)) <= 1
        assert n_hold < len(members)


# ---- tokenisation --------------------------------------------------------------------------------

def test_encoder_adds_cls_sep_and_pads_to_longest(tokenizer_json):
    ids, mask = TextEncoder(tokenizer_json, seq_len=16).encode(["the stock market", "a"])
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (2, 5)
    assert ids[0].tolist()[0] == CLS and ids[0].tolist()[-1] == SEP and UNK not in ids[0]
    assert ids[1].tolist() == [CLS, ids[1, 1], SEP, PAD, PAD]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert np.all((ids == PAD) == (mask == 0))


def test_encoder_truncation_keeps_sep_at_the_end(tokenizer_json):
    long_text = " ".join(["the stock market shares bank profit"] * 10)
    ids, mask = TextEncoder(tokenizer_json, seq_len=8).encode([long_text, "the"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == CLS and ids[0, -1] == SEP and mask[0].all()
    assert (ids[0, 1:-1] != SEP).all()


def test_encoder_pads_to_seq_len_when_asked(tokenizer_json):
    ids, mask = TextEncoder(tokenizer_json, seq_len=12, pad_to_seq_len=True).encode(["the cup"])
    assert ids.shape == (1, 12) and mask.sum() == 4 and (ids[0, 4:] == PAD).all()


def test_encoder_pad_id_comes_from_padding_config(tokenizer_json, tmp_path):
    config = json.loads(tokenizer_json.read_text())
    config["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 4, "pad_type_id": 0, "pad_token": "[MASK]"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config))
    ids, mask = TextEncoder(path, seq_len=16).encode(["the cup", "a"])
    assert ids.shape == (2, 4)  # the file's Fixed(32) padding is not applied: we pad to the longest
    assert ids[1, 3] == 4 and mask[1].tolist() == [1, 1, 1, 0]


def test_encoder_rejects_seq_len_without_room_for_text(tokenizer_json):
    with pytest.raises(ValueError, match="seq_len 2 leaves no room"):
        TextEncoder(tokenizer_json, seq_len=2)


# ---- the dataset ---------------------------------------------------------------------------------

WORDS = ["the", "stock market shares bank profit film music", "a", "election minister party", "the team won the cup"]


@pytest.fixture
def dataset_file(tmp_path):
    rows = [{"text": f"{WORDS[i % 5]} {'new ' * (i % 7)}", "label": LABELS[i % 5]} for i in range(43)]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_dataset_batches_cover_train_once_per_epoch_shuffled(dataset_file, tokenizer_json):
    data = LocalDataset(dataset_file, LABELS, TextEncoder(tokenizer_json, seq_len=12), holdout_fraction=0.2, seed=3)
    assert data.train_size + data.holdout_size == 43 and data.holdout_size == 10
    train_rows = sorted(tuple(r) for r in data._ids[data.train_idx])
    rng = np.random.default_rng(0)
    orders = []
    for _ in range(2):
        batches = list(data.batches(8, rng))
        assert [len(b[2]) for b in batches] == [8, 8, 8, 8, 1]  # last partial batch kept
        width = data._ids.shape[1]
        rows = [tuple(r) for ids, _, _ in batches for r in np.pad(ids, ((0, 0), (0, width - ids.shape[1])))]
        assert sorted(rows) == train_rows  # every train row exactly once, no holdout row
        orders.append(rows)
    assert orders[0] != orders[1]  # the same rng reshuffles each epoch
    in_file_order = [tuple(r) for r in data._ids[data.train_idx]]
    assert orders[0] != in_file_order


def test_dataset_batches_are_trimmed_to_their_longest_row(dataset_file, tokenizer_json):
    data = LocalDataset(dataset_file, LABELS, TextEncoder(tokenizer_json, seq_len=12), holdout_fraction=0.2, seed=3)
    widths = set()
    for ids, mask, labels in data.batches(2, np.random.default_rng(0)):
        assert ids.shape == mask.shape and ids.dtype == mask.dtype == labels.dtype == np.int64
        assert mask[:, -1].any() and ids.flags.c_contiguous  # no all-padding column at the end
        assert ((ids == SEP).sum(axis=1) == 1).all()
        widths.add(ids.shape[1])
    assert len(widths) > 1
    fixed = LocalDataset(dataset_file, LABELS, TextEncoder(tokenizer_json, seq_len=12, pad_to_seq_len=True))
    assert {b[0].shape[1] for b in fixed.batches(2, np.random.default_rng(0))} == {12}


def test_dataset_holdout_in_order_and_label_counts(dataset_file, tokenizer_json):
    data = LocalDataset(dataset_file, LABELS, TextEncoder(tokenizer_json, seq_len=12), holdout_fraction=0.2, seed=3)
    labels = np.concatenate([b[2] for b in data.holdout_batches(3)])
    assert labels.tolist() == data._labels[data.holdout_idx].tolist()
    assert data.holdout_idx.tolist() == sorted(data.holdout_idx)
    assert [len(b[2]) for b in data.holdout_batches(3)] == [3, 3, 3, 1]
    assert data.label_counts("all") == {"business": 9, "entertainment": 9, "politics": 9, "sport": 8, "tech": 8}
    assert data.label_counts("holdout") == {label: 2 for label in LABELS}
    assert data.label_counts() == {"business": 7, "entertainment": 7, "politics": 7, "sport": 6, "tech": 6}


def test_dataset_label_counts_include_absent_labels(tmp_path, tokenizer_json):
    path = write(tmp_path / "d.csv", "text,label\nthe cup,sport\nthe goal,sport\n")
    data = LocalDataset(path, LABELS, TextEncoder(tokenizer_json, seq_len=8), holdout_fraction=0.0)
    assert data.label_counts() == {"business": 0, "entertainment": 0, "politics": 0, "sport": 2, "tech": 0}
    assert data.holdout_size == 0 and list(data.holdout_batches(4)) == []


def test_dataset_surfaces_unknown_labels(tmp_path, tokenizer_json):
    path = write(tmp_path / "d.csv", "text,label\nthe cup,sport\nthe sun,weather\n")
    with pytest.raises(LocalDataError, match=r"d\.csv, line 3: unknown label 'weather'"):
        LocalDataset(path, LABELS, TextEncoder(tokenizer_json, seq_len=8))


# ---- the light install ---------------------------------------------------------------------------

def test_import_pulls_in_no_heavy_package():
    code = ("import sys\nimport edge_runtime.local_data\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx', 'pandas', "
            "'pyarrow', 'export', 'broker_server', 'fftmoe'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
