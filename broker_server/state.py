"""The server's durable state folder: global arrays, round number, usage, optimiser state, logs.

A round is committed in an order that survives a kill at any point:
1. `global-NNNNNN.npz` and `optimizer-NNNNNN.npz` for the new round are written (tmp, fsync, rename);
2. `state.json` is atomically replaced to point at them (the commit point);
3. the round's record is appended to `metrics.jsonl`, and the files of older rounds are removed.
On load, `metrics.jsonl` is repaired against `state.json`: lines of uncommitted rounds (or a
half-written line) are dropped and a missing record of the last committed round is re-appended,
so every completed round is in the folder exactly once. A corrupt file is an error naming it,
never a silent fresh start. No pickle: arrays are `.npz` read with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.local_state import atomic_write_bytes

STATE_SCHEMA = 1


class StateError(RuntimeError):
    """The state folder cannot be read or written; the message names the file."""


@dataclass
class ServerState:
    round: int  # completed rounds; the next round to run has this index
    global_arrays: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    usage: dict[str, list[float]] = field(default_factory=dict)  # layer -> share per global expert
    backbone_sha256: str = ""
    last_record: dict | None = None  # the metrics record of the last committed round


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # BadZipFile: truncated npz
        raise StateError(f"server state file {path} is corrupt or truncated ({err}); restore it from a backup "
                         "or start a new state folder") from err


class StateStore:
    """One server state folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.state_file = self.folder / "state.json"
        self.metrics_file = self.folder / "metrics.jsonl"

    def check_writable(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StateError(f"state folder {self.folder} is not writable: {err.strerror or err}") from err

    def load(self) -> ServerState | None:
        """The committed state, or None for a new folder."""
        for leftover in self.folder.glob(".*.tmp-*"):  # a server killed mid-write; never part of a round
            leftover.unlink(missing_ok=True)
        if not self.state_file.exists():
            return None
        try:
            meta = json.loads(self.state_file.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            if meta.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {meta.get('schema')} is not {STATE_SCHEMA}")
            state = ServerState(round=int(meta["round"]), global_arrays=_load_npz(self.folder / meta["global_file"]),
                                optimizer=_load_npz(self.folder / meta["optimizer_file"]),
                                usage={k: [float(x) for x in v] for k, v in meta["usage"].items()},
                                backbone_sha256=str(meta.get("backbone_sha256", "")),
                                last_record=meta.get("last_record"))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, StateError):
                raise
            raise StateError(f"server state file {self.state_file} is corrupt ({err}); restore it from a backup "
                             "or start a new state folder") from err
        self._repair_metrics(state)
        return state

    def commit(self, state: ServerState) -> None:
        """Durably record `state` (whose `round` was just completed) and its metrics record."""
        tag = f"{state.round:06d}"
        global_file, optimizer_file = f"global-{tag}.npz", f"optimizer-{tag}.npz"
        try:
            atomic_write_bytes(self.folder / global_file, _npz_bytes(state.global_arrays))
            atomic_write_bytes(self.folder / optimizer_file, _npz_bytes(state.optimizer))
            meta = {"schema": STATE_SCHEMA, "round": state.round, "global_file": global_file,
                    "optimizer_file": optimizer_file, "usage": state.usage,
                    "backbone_sha256": state.backbone_sha256, "last_record": state.last_record}
            atomic_write_bytes(self.state_file, (json.dumps(meta, indent=1) + "\n").encode())
        except OSError as err:
            raise StateError(f"cannot write the server state in {self.folder}: {err.strerror or err}; the "
                             f"previous round's state is intact") from err
        if state.last_record is not None:
            self._append_metrics(state.last_record)
        for old in self.folder.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].npz"):
            if old.name not in (global_file, optimizer_file):
                old.unlink(missing_ok=True)

    def _append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        records = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a half-written last line from a kill mid-append
        return records

    def _repair_metrics(self, state: ServerState) -> None:
        """Keep exactly the records of committed rounds (round index < state.round), each once."""
        kept, seen = [], set()
        for record in self.metrics():
            r = record.get("round")
            if isinstance(r, int) and r < state.round and r not in seen:
                kept.append(record)
                seen.add(r)
        if state.last_record is not None and state.last_record.get("round") not in seen:
            kept.append(state.last_record)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        if not self.metrics_file.exists() or self.metrics_file.read_text(encoding="utf-8") != text:
            atomic_write_bytes(self.metrics_file, text.encode())
