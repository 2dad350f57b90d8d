"""A device owner's own data files, read, checked, split, tokenised and batched for the trainer.

Reads CSV, JSON Lines and Parquet (Parquet needs the optional `pyarrow`), maps labels through the
manifest's label list, splits off a stratified held-out set and tokenises with a `tokenizer.json`
(the `tokenizers` library, no transformers). Every problem with a file is a `LocalDataError` whose
message names the file and the line or row, so an owner can fix it in an editor. It is not the
built-in datasets (`builtin_data.py`), the trainer (`trainer.py`) or a partitioner for emulation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json-lines": "jsonl", ".parquet": "parquet"}
_WHERE = {"csv": "line", "jsonl": "line", "parquet": "row"}  # CSV/JSONL: line in the file; Parquet: data row


class LocalDataError(ValueError):
    """A local data file cannot be used; the message names the file, the line or row, and the fix."""


class Record(NamedTuple):
    text: str
    label: str  # as written in the file, ints turned into their decimal string
    row: int  # CSV/JSONL: 1-based line where the record starts (CSV header is line 1); Parquet: 1-based row


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LocalDataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                             f"use one of {', '.join(FORMATS)}")
    return fmt


def _where(source: str | Path, row: int) -> str:
    """'data.csv, line 3' or 'data.parquet, row 3'."""
    return f"{source}, {_WHERE.get(FORMATS.get(Path(source).suffix.lower(), ''), 'row')} {row}"


def _record(source: Path, row: int, text: object, label: object, text_column: str, label_column: str) -> Record:
    """Checks one record's values; labels may be strings or ints (compared as strings)."""
    where = _where(source, row)
    if text is None:
        raise LocalDataError(f"{where}: text column {text_column!r} is missing (null)")
    if not isinstance(text, str):
        raise LocalDataError(f"{where}: text column {text_column!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise LocalDataError(f"{where}: text column {text_column!r} is empty")
    if isinstance(label, bool) or not isinstance(label, (str, int, type(None))):
        raise LocalDataError(f"{where}: label column {label_column!r} must be a string or an integer, "
                             f"got {type(label).__name__}")
    label = "" if label is None else str(label).strip()
    if not label:
        raise LocalDataError(f"{where}: label column {label_column!r} is missing or empty")
    return Record(text, label, row)


def _missing_column(source: Path, column: str, role: str, present: Sequence[str],
                    row: int | None = None) -> LocalDataError:
    where = f"{source}" if row is None else _where(source, row)
    return LocalDataError(f"{where}: no {role} column {column!r}; columns present: "
                          f"{', '.join(map(repr, present)) or '(none)'} "
                          "(name the columns with the text/label column options)")


def _read_csv(path: Path, text_column: str, label_column: str) -> list[Record]:
    # utf-8-sig drops a BOM; newline="" lets the csv module keep quoted newlines inside fields.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise LocalDataError(f"{path}: the file is empty (a header row with the column names is required)")
        header = [h.strip() for h in header]
        for column, role in ((text_column, "text"), (label_column, "label")):
            if column not in header:
                raise _missing_column(path, column, role, header)
        text_at, label_at = header.index(text_column), header.index(label_column)
        records = []
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: report where the record starts
            row = next(reader, None)
            if row is None:
                break
            if not row:  # blank line
                continue
            if len(row) != len(header):
                raise LocalDataError(f"{_where(path, start)}: {len(row)} fields but the header has {len(header)} "
                                     "(quote fields that contain commas)")
            records.append(_record(path, start, row[text_at], row[label_at], text_column, label_column))
    return records


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[Record]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LocalDataError(f"{_where(path, line_no)}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise LocalDataError(f"{_where(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
            for column, role in ((text_column, "text"), (label_column, "label")):
                if column not in obj:
                    raise _missing_column(path, column, role, list(obj), line_no)
            records.append(_record(path, line_no, obj[text_column], obj[label_column], text_column, label_column))
    return records


def _read_parquet(path: Path, text_column: str, label_column: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq  # optional on devices: imported only for Parquet files
    except ImportError:
        raise LocalDataError(f"{path}: reading Parquet needs pyarrow, an optional dependency on devices "
                             "(pip install pyarrow), or convert the file to CSV or JSON Lines") from None
    try:
        names = pq.read_schema(path).names
        for column, role in ((text_column, "text"), (label_column, "label")):
            if column not in names:
                raise _missing_column(path, column, role, names)
        table = pq.read_table(path, columns=list(dict.fromkeys([text_column, label_column])))
    except LocalDataError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, like LocalDataError
        raise LocalDataError(f"{path}: not a readable Parquet file ({e})") from None
    texts, labels = table.column(text_column).to_pylist(), table.column(label_column).to_pylist()
    return [_record(path, i + 1, t, y, text_column, label_column) for i, (t, y) in enumerate(zip(texts, labels))]


def load_records(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[Record]:
    """(text, label, row) for every record of a CSV, JSON Lines or Parquet file, in file order.

    The format follows the extension. Raises `LocalDataError` naming the file and the line/row for a
    missing column, empty or non-string text, a missing label, malformed JSON or an empty file.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise LocalDataError(f"{path}: no such file")
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    try:
        records = reader(path, text_column, label_column)
    except UnicodeDecodeError as e:
        raise LocalDataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except csv.Error as e:
        raise LocalDataError(f"{path}: malformed CSV ({e})") from None
    if not records:
        raise LocalDataError(f"{path}: the file has no data rows")
    return records


def encode_labels(records: Sequence[Record], labels: tuple[str, ...], source: str | Path) -> np.ndarray:
    """Class indices [N] int64 through the manifest's label list; an unknown label names its row."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.empty(len(records), dtype=np.int64)  # [N]
    for i, (_, label, row) in enumerate(records):
        if label not in index:
            raise LocalDataError(f"{_where(source, row)}: unknown label {label!r}; the model's labels are: "
                                 f"{', '.join(map(repr, labels))}")
        out[i] = index[label]
    return out


def split_holdout(n: int, fraction: float, seed: int,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, holdout_idx), sorted int64 index arrays that partition range(n).

    With `labels` [n] the split is stratified: each class puts round(fraction * size) samples in the
    holdout but always keeps at least one in train. The same seed gives the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    holdout = []
    for members in groups:  # classes in sorted order, so the draws are reproducible
        take = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        holdout.append(rng.permutation(members)[:max(take, 0)])
    holdout_idx = np.sort(np.concatenate(holdout)).astype(np.int64) if holdout else np.empty(0, np.int64)
    train_idx = np.setdiff1d(np.arange(n, dtype=np.int64), holdout_idx)
    return train_idx, holdout_idx


class TextEncoder:
    """Texts -> (input_ids [N, T], attention_mask [N, T]) int64 with a `tokenizer.json`.

    Special tokens come from the tokenizer's post-processor; truncation to `seq_len` counts them, so
    [CLS] ... [SEP] survive. Padding is on the right, to the longest text (T <= seq_len) or, with
    `pad_to_seq_len`, always to seq_len (for graphs with a fixed sequence axis).
    """

    def __init__(self, tokenizer_json_path: str | Path, seq_len: int, pad_to_seq_len: bool = False):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        except Exception as e:  # the Rust side raises a plain Exception for a bad file
            raise LocalDataError(f"{tokenizer_json_path}: cannot load tokenizer ({e})") from None
        specials = self.tokenizer.num_special_tokens_to_add(False)
        if seq_len <= specials:  # tokenizers silently skips truncation when max_length < special tokens
            raise ValueError(f"seq_len {seq_len} leaves no room for text after {specials} special tokens")
        padding = self.tokenizer.padding
        if padding is not None:
            self.pad_id = int(padding["pad_id"])
        else:
            pad = self.tokenizer.token_to_id("[PAD]")
            self.pad_id = 0 if pad is None else pad
        self.seq_len, self.pad_to_seq_len = seq_len, pad_to_seq_len
        self.tokenizer.no_padding()  # we pad in numpy; a tokenizer.json may carry its own padding
        self.tokenizer.enable_truncation(max_length=seq_len)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        lengths = [len(e.ids) for e in encodings]
        width = self.seq_len if self.pad_to_seq_len else min(max(lengths, default=0), self.seq_len)
        input_ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)  # [N, T]
        attention_mask = np.zeros((len(encodings), width), dtype=np.int64)  # [N, T]
        for i, (e, length) in enumerate(zip(encodings, lengths)):
            input_ids[i, :length] = e.ids  # length <= width: truncation is at seq_len
            attention_mask[i, :length] = 1
        return input_ids, attention_mask


class LocalDataset:
    """One local file, tokenised once, split into train and held-out parts and served in batches.

    Batches are (input_ids [B, T], attention_mask [B, T], labels [B]) int64. Unless the encoder pads
    to seq_len, each batch's T is trimmed to its longest sequence (the graphs have a dynamic T).
    """

    def __init__(self, path: str | Path, labels: tuple[str, ...], encoder: TextEncoder, text_column: str = "text",
                 label_column: str = "label", holdout_fraction: float = 0.1, seed: int = 0):
        self.path, self.labels = Path(path), tuple(labels)
        records = load_records(self.path, text_column, label_column)
        self._labels = encode_labels(records, self.labels, self.path)  # [N]
        self._ids, self._mask = encoder.encode([r.text for r in records])  # [N, T], [N, T]
        self._lengths = self._mask.sum(axis=1)  # [N]
        self._trim = not encoder.pad_to_seq_len
        self.train_idx, self.holdout_idx = split_holdout(len(records), holdout_fraction, seed, self._labels)

    @property
    def train_size(self) -> int:
        return len(self.train_idx)

    @property
    def holdout_size(self) -> int:
        return len(self.holdout_idx)

    def _batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = int(self._lengths[rows].max()) if self._trim else self._ids.shape[1]
        return (np.ascontiguousarray(self._ids[rows, :width]),  # [B, T]
                np.ascontiguousarray(self._mask[rows, :width]),  # [B, T]
                self._labels[rows])  # [B]

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One epoch over the train split in an order drawn from `rng`; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = rng.permutation(self.train_idx)
        for start in range(0, len(order), batch_size):
            yield self._batch(order[start:start + batch_size])

    def holdout_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The held-out split in file order; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.holdout_size, batch_size):
            yield self._batch(self.holdout_idx[start:start + batch_size])

    def label_counts(self, split: str = "train") -> dict[str, int]:
        """Samples per manifest label (zeros included) in the "train", "holdout" or "all" split."""
        rows = {"train": self.train_idx, "holdout": self.holdout_idx, "all": np.arange(len(self._labels))}.get(split)
        if rows is None:
            raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
        counts = np.bincount(self._labels[rows], minlength=len(self.labels))  # [C]
        return {label: int(c) for label, c in zip(self.labels, counts)}
