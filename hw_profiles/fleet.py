"""Fleet specifications: which emulated devices, of which hardware profiles, take part in a run.

`--fleet pi4-4gb:2,pi5-8gb:1` (profile:count pairs) or a TOML file:

    [[device]]
    profile = "pi4-4gb"
    count = 2

The default fleet is six heterogeneous devices from a Pi Zero 2 W to a Jetson Orin Nano, so the
default run exercises every default tier. This module only parses; `run.py` launches.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_FLEET = "pi-zero-2w:1,pi4-2gb:1,pi4-4gb:1,pi5-8gb:1,jetson-nano:1,orin-nano:1"
_ITEM = re.compile(r"^([A-Za-z0-9_./~-]+?)(?::(\d+))?$")  # a profile name or a profile TOML path


class FleetError(ValueError):
    """A fleet specification is malformed."""


@dataclass(frozen=True)
class FleetMember:
    device_id: str
    profile: str


def parse_fleet(spec: str) -> list[FleetMember]:
    """Devices of a `profile:count,...` string or a fleet TOML file, numbered dev0, dev1, ..."""
    pairs: list[tuple[str, int]] = []
    path = Path(spec)
    if spec.endswith(".toml") and "," not in spec and path.is_file() and "[[device]]" in path.read_text():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise FleetError(f"cannot read fleet file {spec}: {err}") from err
        for i, entry in enumerate(data.get("device", [])):
            unknown = set(entry) - {"profile", "count"}
            if unknown or not isinstance(entry.get("profile"), str):
                raise FleetError(f"{spec}: [[device]] #{i + 1} needs profile = \"NAME\" and optional count "
                                 f"(unknown keys: {sorted(unknown)})")
            count = entry.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise FleetError(f"{spec}: [[device]] #{i + 1}: count = {count!r} must be a positive integer")
            pairs.append((entry["profile"], count))
    else:
        for item in filter(None, (x.strip() for x in spec.split(","))):
            match = _ITEM.match(item)
            if not match:
                raise FleetError(f"fleet entry {item!r} must look like PROFILE or PROFILE:COUNT (e.g. pi4-4gb:2)")
            pairs.append((match.group(1), int(match.group(2) or 1)))
    members = [FleetMember(f"dev{i}", profile) for i, profile in
               enumerate(profile for profile, count in pairs for _ in range(count))]
    if not members:
        raise FleetError(f"fleet {spec!r} has no devices")
    return members
