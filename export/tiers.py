"""Budget tiers: validated, frozen configuration loaded from a TOML file.

A tier fixes what one class of device trains: experts held (slots), top-k, how many of the last
layers are adapted, sequence length and batch size. Expert count M and rank r are global, so every
slot of every tier can hold any global expert. One tier may be `serving_only`: no device is ever
assigned it, and the served global model (test accuracy, `fftmoe predict`) runs on it; it exists for
tier sets where no device tier holds every global expert. This module parses and checks the file;
checks that need the backbone (sequence length, layer count) are in `TierSpec.check_against`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class TierConfigError(ValueError):
    """A tiers file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Tier:
    """One device budget tier."""

    name: str
    experts_held: int  # M_t: expert slots per adapted layer
    top_k: int  # k_t: experts each token is routed to
    adapted_layers: int  # L_t: the last L_t encoder layers carry adapters
    seq_len: int  # tokens per sample
    batch_size: int  # samples per local step
    description: str = ""
    lora_rank: int = 0  # rank of the LoRA baselines' adapters in this tier; 0 = the global rank r
    serving_only: bool = False  # never assigned to a device; the served global model runs on it


@dataclass(frozen=True)
class TierSpec:
    """The whole tiers file: global expert pool and the tiers, smallest first."""

    experts: int  # M: global experts per adapted layer
    rank: int  # r: expert hidden width, the same in every tier
    tiers: tuple[Tier, ...]
    source: str = "<built-in>"

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierConfigError(f"{self.source}: no tier named {name!r} (have: {', '.join(t.name for t in self.tiers)})")

    @property
    def training_tiers(self) -> tuple[Tier, ...]:
        """The tiers devices train (every tier but a serving-only one)."""
        return tuple(t for t in self.tiers if not t.serving_only)

    def without_serving_tier(self) -> TierSpec:
        """The spec the LoRA baselines export: a LoRA global adapter is served at the largest trained rank,
        so a serving-only tier would only repeat one."""
        return replace(self, tiers=self.training_tiers)

    @property
    def global_layers(self) -> int:
        """How many top layers the global pool covers: the most any tier adapts."""
        return max(t.adapted_layers for t in self.tiers)

    def check_against(self, num_layers: int, max_positions: int) -> None:
        """Checks that need the backbone: layer count and maximum sequence length."""
        for t in self.tiers:
            if t.adapted_layers > num_layers:
                raise TierConfigError(f"{self.source}: tier {t.name!r} adapts {t.adapted_layers} layers "
                                      f"but the model has only {num_layers}")
            if t.seq_len > max_positions:
                raise TierConfigError(f"{self.source}: tier {t.name!r} has seq_len {t.seq_len} above the "
                                      f"model's maximum of {max_positions} positions")


_GLOBAL_KEYS = {"experts", "rank"}
_TIER_KEYS = {f.name for f in fields(Tier)} - {"name"}


def _int(source: str, where: str, table: dict, key: str, low: int, high: int) -> int:
    value = table.get(key)
    if value is None:
        raise TierConfigError(f"{source}: {where} is missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TierConfigError(f"{source}: {where}.{key} = {value!r} must be an integer in [{low}, {high}]")
    return value


def parse_tiers(text: str, source: str = "<string>") -> TierSpec:
    """Parse and validate tiers TOML; raises TierConfigError naming the file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TierConfigError(f"{source}: not valid TOML: {err}") from err
    unknown = set(data) - {"global", "tiers"}
    if unknown:
        raise TierConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected [global] and [tiers.NAME]")
    glob = data.get("global", {})
    bad = set(glob) - _GLOBAL_KEYS
    if bad:
        raise TierConfigError(f"{source}: unknown key(s) {sorted(bad)} in [global]; allowed: {sorted(_GLOBAL_KEYS)}")
    experts = _int(source, "[global]", glob, "experts", 1, 256)
    rank = _int(source, "[global]", glob, "rank", 1, 4096)
    tables = data.get("tiers", {})
    if not tables:
        raise TierConfigError(f"{source}: no tiers defined; add at least one [tiers.NAME] table")
    tiers = []
    for name, table in tables.items():
        where = f"[tiers.{name}]"
        if not _NAME.match(name):
            raise TierConfigError(f"{source}: tier name {name!r} must be lowercase letters, digits, '-' or '_'")
        bad = set(table) - _TIER_KEYS
        if bad:
            raise TierConfigError(f"{source}: unknown key(s) {sorted(bad)} in {where}; allowed: {sorted(_TIER_KEYS)}")
        held = _int(source, where, table, "experts_held", 1, 256)
        if held > experts:
            raise TierConfigError(f"{source}: {where}.experts_held = {held} exceeds the global expert count {experts}")
        top_k = _int(source, where, table, "top_k", 1, 256)
        if top_k > held:
            raise TierConfigError(f"{source}: {where}.top_k = {top_k} exceeds experts_held = {held}")
        description = table.get("description", "")
        if not isinstance(description, str):
            raise TierConfigError(f"{source}: {where}.description must be a string")
        serving_only = table.get("serving_only", False)
        if not isinstance(serving_only, bool):
            raise TierConfigError(f"{source}: {where}.serving_only = {serving_only!r} must be true or false")
        tiers.append(Tier(name=name, experts_held=held, top_k=top_k,
                          adapted_layers=_int(source, where, table, "adapted_layers", 1, 1024),
                          seq_len=_int(source, where, table, "seq_len", 2, 1 << 16),
                          batch_size=_int(source, where, table, "batch_size", 1, 4096),
                          description=description,
                          lora_rank=_int(source, where, table, "lora_rank", 1, 4096) if "lora_rank" in table else rank,
                          serving_only=serving_only))
    _check_serving_tier(source, tiers)
    return TierSpec(experts=experts, rank=rank, tiers=tuple(tiers), source=source)


def _check_serving_tier(source: str, tiers: list[Tier]) -> None:
    """At most one serving-only tier, at least one tier to train, and no served layer left untrained."""
    serving = [t for t in tiers if t.serving_only]
    training = [t for t in tiers if not t.serving_only]
    if not training:
        raise TierConfigError(f"{source}: every tier is serving_only, so no device could train; "
                              "set serving_only = false on the device tiers")
    if len(serving) > 1:
        raise TierConfigError(f"{source}: tiers {', '.join(t.name for t in serving)} are all serving_only; "
                              "keep one (the served model runs on a single tier)")
    if serving and serving[0].adapted_layers > max(t.adapted_layers for t in training):
        most = max(t.adapted_layers for t in training)
        raise TierConfigError(f"{source}: [tiers.{serving[0].name}] is serving_only and adapts "
                              f"{serving[0].adapted_layers} layers, but no device tier adapts more than {most}, so "
                              f"those experts would never be trained; set its adapted_layers to at most {most}")


def load_tiers(path: str | Path | None = None) -> TierSpec:
    """Load a tiers file, or the default one shipped with the package when `path` is None."""
    if path is None:
        text = resources.files("export").joinpath("default_tiers.toml").read_text(encoding="utf-8")
        return parse_tiers(text, "default_tiers.toml")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TierConfigError(f"cannot read tiers file {path}: {err.strerror}") from err
    return parse_tiers(text, str(path))
