"""The aggregation audit log, and a replay that recomputes the global model from it.

With `audit_log = true` the server writes every update it folds, in fold order, to
`STATE/audit/round-NNNNNN/SEQ-DEVICE.npz` (the arrays as received, the slot map, the sample and
token counts). A round's folder is cleared when the round (or a retry of it) begins, so a server
killed mid-round leaves nothing that a later run counts twice. `replay` folds the logs of every
committed round through a fresh strategy, starting from the export's `global_init.npz`; with the
same configuration the result equals the committed global arrays bit for bit. Costs disk space of
clients x model per round: off by default, meant for audits and the soak test. No pickle.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from broker_server.aggregation import AggregationConfig, ClientUpdate, FftMoeStrategy, ParamSpace
from edge_runtime.local_state import atomic_write_bytes
from edge_runtime.manifest import Manifest

AUDIT_DIR = "audit"


def round_folder(state_dir: Path, round_: int) -> Path:
    return Path(state_dir) / AUDIT_DIR / f"round-{round_:06d}"


def start_round(state_dir: Path, round_: int) -> None:
    """Forget whatever an earlier, uncommitted attempt at this round logged."""
    folder = round_folder(state_dir, round_)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def record(state_dir: Path, round_: int, seq: int, update: ClientUpdate) -> None:
    arrays = {f"param/{k}": v for k, v in update.params.items()}
    arrays.update({f"slots/{layer}": np.asarray(slots, dtype=np.int64) for layer, slots in update.slot_map.items()})
    arrays.update({f"tokens/{layer}": np.asarray(t, dtype=np.float64) for layer, t in update.expert_tokens.items()})
    arrays["num_samples"] = np.asarray(update.num_samples, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(round_folder(state_dir, round_) / f"{seq:06d}-{update.device_id}.npz", buffer.getvalue())


def load(path: Path) -> ClientUpdate:
    with np.load(path, allow_pickle=False) as data:
        params = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
        slots = {int(k[len("slots/"):]): data[k].tolist() for k in data.files if k.startswith("slots/")}
        tokens = {int(k[len("tokens/"):]): data[k] for k in data.files if k.startswith("tokens/")}
        samples = int(data["num_samples"])
    return ClientUpdate(device_id=path.stem.split("-", 1)[1], params=params, slot_map=slots, num_samples=samples,
                        expert_tokens=tokens)


def replay(state_dir: Path, manifest: Manifest, config: AggregationConfig, rounds: int) -> dict[str, np.ndarray]:
    """Global arrays after folding the logged updates of rounds 0..rounds-1 from the initial arrays."""
    strategy = FftMoeStrategy(ParamSpace(manifest.global_params), config)
    with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for round_ in range(rounds):
        folder = round_folder(state_dir, round_)
        if not folder.is_dir():
            raise FileNotFoundError(f"no audit log for round {round_} in {folder.parent}")
        strategy.begin_round(arrays)
        for path in sorted(folder.glob("*.npz")):  # the sequence prefix is the fold order
            strategy.fold(load(path))
        arrays, _ = strategy.finish()
    return arrays
