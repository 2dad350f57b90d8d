"""A device's durable local state, written so a power cut at any moment leaves the old or the new state.

Every write goes to a temporary file in the same folder, is fsynced, renamed over the old file, and
the folder is fsynced (the rename itself must survive the power cut). Reads never fall back to a
fresh state silently: a corrupt file is an error that names it. Files:
- `state.json`: last global round seen, device id, tier.
- `router.npz`: the personalised router rows, per layer and global expert (only with that option on).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

STATE_FILE = "state.json"
ROUTER_FILE = "router.npz"


class StateFileError(RuntimeError):
    """A state file exists but cannot be read; the message names it and says what to do."""


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    tier: str
    last_round_seen: int | None = None
    rounds_completed: int = 0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalState:
    """The state folder of one device."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def load(self) -> DeviceState | None:
        """The saved state, or None if the device never saved one."""
        path = self.folder / STATE_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return DeviceState(device_id=str(data["device_id"]), tier=str(data["tier"]),
                               last_round_seen=data.get("last_round_seen"),
                               rounds_completed=int(data.get("rounds_completed", 0)))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise StateFileError(f"device state file {path} is corrupt ({err}); move it away to start this "
                                 "device fresh (it will rejoin at the next round)") from err

    def save(self, state: DeviceState) -> None:
        atomic_write_bytes(self.folder / STATE_FILE, (json.dumps(asdict(state), indent=1) + "\n").encode())

    def load_router(self) -> dict[str, np.ndarray]:
        """Personalised router rows: `{layer}/{global expert}` -> row [d]; empty if none saved."""
        path = self.folder / ROUTER_FILE
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k].astype(np.float32) for k in data.files}
        except (OSError, ValueError) as err:
            raise StateFileError(f"personalised router file {path} is corrupt ({err}); move it away to "
                                 "start from the global router") from err

    def save_router(self, rows: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **rows)
        atomic_write_bytes(self.folder / ROUTER_FILE, buffer.getvalue())
