"""Frozen-dataclass configuration from an optional TOML file plus command-line overrides.

One loader for the device and server configurations: unknown keys, missing required keys and
values of the wrong type are errors that name the key and where it came from (the file, or the
command line). Field types are read from the dataclass annotations (`int`, `float`, `bool`,
`str`, each optionally `| None`). Never evaluates anything from the file.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _type_ok(value, annotation: str) -> bool:
    kind = annotation.replace(" | None", "")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def config_values(cls, path: str | Path | None, overrides: dict, required: tuple[str, ...],
                  error: type[ValueError], what: str) -> tuple[dict, str]:
    """(settings, where they came from) for dataclass `cls`: the TOML at `path` (optional) updated by
    non-None `overrides`; unknown keys, missing required keys and wrong types are errors."""
    types = {f.name: f.type for f in fields(cls)}
    values: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise error(f"cannot read {what} {path}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise error(f"{path}: not valid TOML: {err}") from err
        unknown = set(values) - set(types)
        if unknown:
            raise error(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(types)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in required if k not in values]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise error(f"{source}: missing required setting(s) {missing} ({flags}, or keys in --config)")
    for key, value in values.items():
        if not _type_ok(value, types[key]):
            raise error(f"{source}: {key} = {value!r} has the wrong type (expected {types[key]})")
    return values, source


def build_config(cls, values: dict, source: str, error: type[ValueError]):
    """`cls(**values)`, its validation error prefixed with where the values came from."""
    try:
        return cls(**values)
    except error as err:
        raise error(f"{source}: {err}") from err


def load_config(cls, path: str | Path | None, overrides: dict, required: tuple[str, ...], error: type[ValueError],
                what: str):
    """An instance of dataclass `cls` from TOML at `path` (optional) updated by non-None `overrides`."""
    return build_config(cls, *config_values(cls, path, overrides, required, error, what), error)


def read_secret(path: str | None, error: type[ValueError]) -> str | None:
    """The stripped contents of a secret file (a broker password), or None when no file is set."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise error(f"password_file {path}: {err.strerror}") from err
