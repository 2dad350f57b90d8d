"""A device's configuration: validated, frozen, loaded from TOML and overridden by flags.

Example `device.toml`:

    device_id = "pi-kitchen"
    federation = "demo"
    broker = "mqtts://broker.example:8883"
    ca_file = "/etc/fftmoe/ca.crt"
    username = "pi-kitchen"
    password_file = "/etc/fftmoe/password"
    artifacts = "/var/lib/fftmoe/artifacts"
    tier = "small"
    profile = "pi4-4gb"
    data = "/var/lib/fftmoe/data/local.csv"
    state_dir = "/var/lib/fftmoe/state"

Unknown keys and bad values fail loudly with the key and the file. This module does not connect
or train; `agent.py` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from edge_runtime.config_file import load_config, read_secret
from edge_runtime.wire import TopicError, validate_id


class DeviceConfigError(ValueError):
    """The device configuration is invalid; the message names the key and the source."""


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    artifacts: str  # export folder with manifest.json (or a folder holding just this tier)
    tier: str
    data: str  # local training data: CSV, JSON Lines or Parquet
    federation: str = "default"
    broker: str = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None  # a file, so the secret is not on the command line
    profile: str = "generic"
    text_column: str = "text"
    label_column: str = "label"
    holdout_fraction: float = 0.2
    state_dir: str = "fftmoe-device-state"
    threads: int = 2
    seed: int = 0
    chunk_size: int = 256 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    personal_router: bool = False
    label_count_epsilon: float | None = None  # label counts sent only as one epsilon-DP release (label_privacy)
    reset_optimizer: bool = True
    log_every: int = 10  # progress line every N local steps

    def __post_init__(self) -> None:
        for key in ("device_id", "federation", "tier", "profile"):
            try:
                validate_id(getattr(self, key), key)
            except TopicError as err:
                raise DeviceConfigError(f"{key}: {err}") from err
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise DeviceConfigError(f"holdout_fraction = {self.holdout_fraction} must be in [0, 1)")
        for key in ("threads", "chunk_size", "max_message_bytes", "log_every"):
            if getattr(self, key) < 1:
                raise DeviceConfigError(f"{key} = {getattr(self, key)} must be at least 1")
        if self.label_count_epsilon is not None and not 0 < self.label_count_epsilon < math.inf:
            raise DeviceConfigError(f"label_count_epsilon = {self.label_count_epsilon} must be a positive finite "
                                    "number (leave it unset to send exact label counts)")
        if self.chunk_size < 1024:
            raise DeviceConfigError(f"chunk_size = {self.chunk_size} is too small (at least 1024 bytes)")

    def password(self) -> str | None:
        return read_secret(self.password_file, DeviceConfigError)


def load_device_config(path: str | Path | None, overrides: dict) -> DeviceConfig:
    """Read a TOML file (optional) and apply non-None overrides; validate everything."""
    return load_config(DeviceConfig, path, overrides, ("device_id", "artifacts", "tier", "data"), DeviceConfigError,
                       "device config")


__all__ = ["DeviceConfig", "DeviceConfigError", "load_device_config", "replace"]
