"""The export manifest: what an artifact folder contains, read and verified without torch.

`fftmoe export` writes one `manifest.json` per export (through `Manifest.to_json`); devices, the
server and the emulator read it with `load_manifest`. It records the backbone identity, the global
parameter space (names and shapes of the global expert pool and head), every tier's parameters and
which global block each slot maps to, the graph inputs and outputs, the labels, sha256 of every
file, tool versions and what was measured at export. It is not the artifact loader (`trainer.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
GLOBAL_INIT_NAME = "global_init.npz"


class ManifestError(ValueError):
    """manifest.json is missing, unreadable, of another schema, or inconsistent."""


class ArtifactIntegrityError(ValueError):
    """An artifact file is missing or its sha256 differs from the manifest."""


# The LoRA baselines' factor names, `<frozen weight>.fftmoe_lora_A` [r, d_in] and `.fftmoe_lora_B` [d_out, r]:
# the exporter names its parameters so and the server's LoRA strategies find them so.
LORA_A, LORA_B = "fftmoe_lora_A", "fftmoe_lora_B"


def layer_of(name: str) -> int | None:
    """Encoder layer of an adapter array name (`...layer.{l}...`), None for the head: the naming rule
    the exporter writes into `ParamEntry.layer` and the server reads back."""
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1]) if "layer" in parts else None


@dataclass(frozen=True)
class ParamEntry:
    """One trainable array of a tier. `slot_axis` is 0 for per-expert stacks, None for the head."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    slot_axis: int | None
    layer: int | None  # encoder layer index for adapter params, None for the head


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the export folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TierEntry:
    name: str
    experts_held: int
    top_k: int
    adapted_layers: tuple[int, ...]  # encoder layer indices, bottom to top
    seq_len: int
    batch_size: int
    params: tuple[ParamEntry, ...]
    files: dict[str, FileEntry]  # role (training_model, eval_model, ...) -> file
    measured: dict[str, float] = field(default_factory=dict)  # peak_rss_mb, step_ms, threads
    description: str = ""
    rank: int = 0  # LoRA exports: this tier's LoRA rank (FFT-MoE: the global expert rank r)
    serving_only: bool = False  # the served global model's tier; never assigned to a device

    @property
    def trainable_params(self) -> int:
        """Number of trainable values of the tier (its size for ordering and reports)."""
        total = 0
        for p in self.params:
            count = 1
            for dim in p.shape:
                count *= dim
            total += count
        return total

    def param(self, name: str) -> ParamEntry:
        for p in self.params:
            if p.name == name:
                return p
        raise ManifestError(f"tier {self.name!r} has no parameter {name!r}")


@dataclass(frozen=True)
class Manifest:
    schema: int
    backbone: dict  # id, sha256, hidden_size, num_layers, max_positions
    labels: tuple[str, ...]
    experts: int  # M
    rank: int  # r
    global_params: tuple[ParamEntry, ...]  # the global pool; slot_axis entries have M rows
    train_inputs: tuple[str, ...]
    train_outputs: tuple[str, ...]
    infer_inputs: tuple[str, ...]
    infer_outputs: tuple[str, ...]
    tiers: dict[str, TierEntry]
    global_init: FileEntry
    versions: dict[str, str]
    method: str = "fft-moe"  # the adapters: "fft-moe" (MoE experts, slot maps) or "lora" (the baselines)
    root: Path = Path(".")

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    @property
    def training_tiers(self) -> dict[str, TierEntry]:
        """The tiers devices train: every tier but a serving-only one."""
        return {name: t for name, t in self.tiers.items() if not t.serving_only}

    def not_a_device_tier(self, name: str) -> str:
        """How an error names a tier no device can train: "the serving-only tier 'x'" or "unknown tier 'x'"."""
        return f"{'the serving-only' if name in self.tiers else 'unknown'} tier {name!r}"

    def tier(self, name: str) -> TierEntry:
        if name not in self.tiers:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: no tier {name!r} (have: {', '.join(self.tiers)})")
        return self.tiers[name]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), bytes=path.stat().st_size)


def _param(d: dict) -> ParamEntry:
    return ParamEntry(name=d["name"], shape=tuple(int(x) for x in d["shape"]), dtype=d["dtype"],
                      slot_axis=d["slot_axis"], layer=d["layer"])


def _file(d: dict) -> FileEntry:
    return FileEntry(path=d["path"], sha256=d["sha256"], bytes=int(d["bytes"]))


def load_manifest(folder: str | Path) -> Manifest:
    """Read `folder/manifest.json`; raises ManifestError naming the file on any problem."""
    root = Path(folder)
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: point at a folder written by `fftmoe export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is unreadable or not JSON ({err}); re-run `fftmoe export`") from err
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise ManifestError(f"{path}: manifest schema {data.get('schema') if isinstance(data, dict) else '?'} "
                            f"is not {MANIFEST_SCHEMA}; re-export with this fftmoe version")
    try:
        tiers = {
            name: TierEntry(name=t["name"], experts_held=t["experts_held"], top_k=t["top_k"],
                            adapted_layers=tuple(t["adapted_layers"]), seq_len=t["seq_len"],
                            batch_size=t["batch_size"], params=tuple(_param(p) for p in t["params"]),
                            files={k: _file(v) for k, v in t["files"].items()},
                            measured=dict(t.get("measured", {})), description=t.get("description", ""),
                            rank=int(t.get("rank", data["rank"])), serving_only=bool(t.get("serving_only", False)))
            for name, t in data["tiers"].items()
        }
        manifest = Manifest(schema=data["schema"], backbone=dict(data["backbone"]), labels=tuple(data["labels"]),
                            experts=int(data["experts"]), rank=int(data["rank"]),
                            global_params=tuple(_param(p) for p in data["global_params"]),
                            train_inputs=tuple(data["train_inputs"]), train_outputs=tuple(data["train_outputs"]),
                            infer_inputs=tuple(data["infer_inputs"]), infer_outputs=tuple(data["infer_outputs"]),
                            tiers=tiers, global_init=_file(data["global_init"]), versions=dict(data["versions"]),
                            method=str(data.get("method", "fft-moe")), root=root)
        if manifest.method not in ("fft-moe", "lora"):
            raise ValueError(f"unknown adapter method {manifest.method!r}")
        return manifest
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"{path}: missing or malformed field ({err!r}); re-run `fftmoe export`") from err


def verify_files(manifest: Manifest, entries: list[FileEntry]) -> None:
    """Check that each file exists with the recorded size and sha256; names the first bad file."""
    for entry in entries:
        path = manifest.root / entry.path
        if not path.is_file():
            raise ArtifactIntegrityError(f"{path} is missing (listed in {manifest.root / MANIFEST_NAME})")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ArtifactIntegrityError(f"{path} does not match its sha256 in the manifest: the file is corrupt, "
                                         "truncated or from another export; copy the tier folder again")


def verify_tier(manifest: Manifest, tier: str) -> TierEntry:
    """Verify every file of one device tier and return its entry; a serving-only tier is refused
    (ManifestError), since a device training it would hold experts no budget was sized for."""
    entry = manifest.tier(tier)
    if entry.serving_only:
        raise ManifestError(f"{manifest.root / MANIFEST_NAME}: tier {tier!r} is serving-only (the served global "
                            f"model runs on it; no device trains it); choose one of: "
                            f"{', '.join(manifest.training_tiers)}")
    verify_files(manifest, list(entry.files.values()))
    return entry
