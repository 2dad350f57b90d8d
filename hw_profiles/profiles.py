"""Device hardware profiles: load and validate them, and map a profile to the exported tier it can train.

A profile (one TOML file per device class in `hw_profiles/profiles/`) says what an emulated device has:
cores, RAM, the speed of one core on a float32 matmul, its link and its availability. This module reads
profiles, checks them, picks a tier from an export manifest and calibrates this host's core speed (in a
subprocess, `hw_profiles.calibrate`). It does not emulate anything: `edge_runtime.emulation` applies a
profile to a running device. Never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edge_runtime.emulation import device_seconds, link_seconds
from edge_runtime.manifest import Manifest, TierEntry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
CACHE_SCHEMA = 1


class ProfileError(ValueError):
    """A profile is unknown, unreadable, or has a missing, unknown, mistyped or out-of-range key."""


class CalibrationError(RuntimeError):
    """The host micro-benchmark failed."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    cpu_cores: int
    cpu_ghz: float
    cpu_model: str
    ram_mb: int
    os_reserved_mb: int  # RAM the OS and its services keep
    core_gflops: float  # sustained fp32 GFLOPS of one core on a single-threaded matmul
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float  # one way
    availability: float  # probability the device completes a round it was given
    source: str = ""  # the TOML file it was loaded from (not a TOML key)

    @property
    def usable_ram_mb(self) -> int:
        return self.ram_mb - self.os_reserved_mb

    @property
    def total_gflops(self) -> float:
        return self.core_gflops * self.cpu_cores


_TYPES = {f.name: f.type for f in fields(Profile) if f.name != "source"}  # "str" | "int" | "float"
KEYS = tuple(_TYPES)  # the TOML keys, in file order
_WANTED = {"str": "a non-empty string", "int": "an integer", "float": "a finite number"}
_RANGES = {  # key -> (test on the value and the whole table, what the value must be)
    **{k: (lambda v, d: v > 0, "positive") for k in ("cpu_cores", "cpu_ghz", "ram_mb", "core_gflops",
                                                      "uplink_mbps", "downlink_mbps")},
    "latency_ms": (lambda v, d: v >= 0, ">= 0"),
    "os_reserved_mb": (lambda v, d: 0 <= v < d["ram_mb"], ">= 0 and below ram_mb"),
    "availability": (lambda v, d: 0 < v <= 1, "in (0, 1]"),
}


def _check(data: dict, path: Path) -> dict:
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise ProfileError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(_TYPES)})")
    for key, kind in _TYPES.items():
        if key not in data:
            raise ProfileError(f"{path}: missing key {key!r}")
        value = data[key]
        ok = {"str": isinstance(value, str) and value.strip() != "",
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}[kind]
        if not ok:
            raise ProfileError(f"{path}: key {key!r} must be {_WANTED[kind]}, got {value!r}")
    for key, (test, wanted) in _RANGES.items():
        if not test(data[key], data):
            raise ProfileError(f"{path}: key {key!r} must be {wanted}, got {data[key]!r}")
    return {k: float(v) if _TYPES[k] == "float" else v for k, v in data.items()}


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def profile_path(name_or_path: str | Path) -> Path:
    """The TOML file of a built-in profile name (`pi4-4gb`), or the given path of any profile file."""
    text = str(name_or_path)
    if Path(text).suffix == ".toml" or os.sep in text or Path(text).is_file():
        return Path(text)
    if not (PROFILES_DIR / f"{text}.toml").is_file():
        raise ProfileError(f"unknown profile {text!r} (known: {', '.join(builtin_names())})")
    return PROFILES_DIR / f"{text}.toml"


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (`pi4-4gb`), or any profile TOML file by path."""
    path = profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ProfileError(f"{path}: cannot read profile ({err.strerror or err})") from err
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ProfileError(f"{path}: not valid TOML ({err})") from err
    return Profile(**_check(data, path), source=str(path))


def list_profiles() -> list[Profile]:
    """The built-in profiles, slowest device first (by cores x core GFLOPS)."""
    return sorted((load_profile(n) for n in builtin_names()), key=lambda p: (p.total_gflops, p.name))


def transfer_seconds(profile: Profile, nbytes: int, direction: str) -> float:
    """Seconds to move `nbytes` over the profile's link: one-way latency + bits / bandwidth.
    `direction` is "up" (device -> server) or "down"."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return link_seconds(nbytes, profile.uplink_mbps if direction == "up" else profile.downlink_mbps,
                        profile.latency_ms)


def emulated_step_seconds(profile: Profile, tier: TierEntry, host_core_gflops: float,
                          threads: int | None = None) -> float:
    """One training step of `tier` on the profile's device: the export host's measured work
    (step_ms x threads x host core GFLOPS, assuming linear thread scaling) over the device's cores in use."""
    if "step_cpu_ms" in tier.measured:  # CPU time is the work itself, unaffected by other load on the host
        work_s = float(tier.measured["step_cpu_ms"]) / 1000
    else:  # older manifests: wall time x threads
        work_s = float(tier.measured["step_ms"]) / 1000 * float(tier.measured["threads"])
    return device_seconds(work_s, host_core_gflops, profile.core_gflops,
                          min(profile.cpu_cores, threads or profile.cpu_cores))


MEMORY_SAFETY = 0.8  # share of a device's usable RAM a tier's measured peak may take


def tier_for(profile: Profile, manifest: Manifest, round_budget_s: float | None = None, local_steps: int = 20,
             safety: float = MEMORY_SAFETY, host_core_gflops: float | None = None,
             threads: int | None = None) -> tuple[str | None, list[str]]:
    """The largest tier (most trainable parameters) whose measured peak RSS fits in
    (ram_mb - os_reserved_mb) x safety and, with a round budget, whose `local_steps` emulated steps fit in it.
    Returns (tier name or None, one reason line per tier, largest first). `threads`: device threads (all cores)."""
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if round_budget_s is not None and round_budget_s <= 0:
        raise ValueError(f"round_budget_s must be positive, got {round_budget_s}")
    budget_mb = profile.usable_ram_mb * safety
    if round_budget_s is not None and host_core_gflops is None:
        host_core_gflops = calibrate_host_core_gflops()
    chosen, reasons = None, []
    for tier in sorted(manifest.training_tiers.values(), key=lambda t: (t.trainable_params, t.name), reverse=True):
        head = f"{tier.name} ({tier.trainable_params:,} trainable):"
        if "peak_rss_mb" not in tier.measured or (round_budget_s is not None and not
                                                   {"step_ms", "threads"} <= set(tier.measured)):
            reasons.append(f"{head} not measured in the manifest (re-run `fftmoe export`)")
            continue
        rss = float(tier.measured["peak_rss_mb"])
        mem_ok = rss <= budget_mb
        parts = [f"memory {rss:.0f} MB {'<=' if mem_ok else '>'} {budget_mb:.0f} MB "
                 f"(({profile.ram_mb} - {profile.os_reserved_mb}) x {safety:g}) {'fits' if mem_ok else 'does not fit'}"]
        time_ok = True
        if round_budget_s is not None:
            step_s = emulated_step_seconds(profile, tier, host_core_gflops, threads)
            time_ok = step_s * local_steps <= round_budget_s
            parts.append(f"time {step_s:.2f} s/step x {local_steps} = {step_s * local_steps:.1f} s "
                         f"{'<=' if time_ok else '>'} {round_budget_s:g} s budget "
                         f"{'fits' if time_ok else 'does not fit'}")
        if mem_ok and time_ok and chosen is None:
            chosen = tier.name
        reasons.append(f"{head} {'; '.join(parts)}{' -> chosen' if chosen == tier.name else ''}")
    if not manifest.training_tiers:
        reasons.append("the manifest has no device tiers")
    return chosen, reasons


def _cpu_model() -> str:
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    # x86: "model name"; Raspberry Pi: "Hardware" / "Model"; other aarch64: only "CPU part"
    picked = [found[k] for k in ("model name", "hardware", "model", "cpu part") if found.get(k)]
    return picked[0] if picked else (platform.processor() or platform.machine())


def calibration_key() -> str:
    try:
        numpy_version = version("numpy")
    except PackageNotFoundError:  # pragma: no cover
        numpy_version = "?"
    return f"{socket.gethostname()}|{_cpu_model()}|numpy {numpy_version}"


def calibrate_host_core_gflops(seconds: float = 0.5, refresh: bool = False) -> float:
    """fp32 GFLOPS of one core of this host on the micro-benchmark the profiles' `core_gflops` describe
    (`python -m hw_profiles.calibrate`, BLAS pinned to one thread). Cached per host, CPU model and numpy
    version in ~/.cache/fftmoe/calibration.json; `refresh` measures again."""
    cache, key = Path.home() / ".cache" / "fftmoe" / "calibration.json", calibration_key()
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
        entries = dict(entries["hosts"]) if entries.get("schema") == CACHE_SCHEMA else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # missing, corrupt or foreign: measure
        entries = {}
    cached = entries.get(key)
    if not refresh and isinstance(cached, dict) and type(cached.get("core_gflops")) in (int, float) \
            and cached["core_gflops"] > 0:
        return float(cached["core_gflops"])
    # thread counts must be fixed before numpy loads its BLAS, hence a fresh interpreter
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BLIS_NUM_THREADS="1",
               VECLIB_MAXIMUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [
                   str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "hw_profiles.calibrate", "--seconds", str(seconds)],
                          capture_output=True, text=True, env=env)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        gflops = float(result["core_gflops"])
    except (IndexError, ValueError, KeyError, TypeError):
        gflops = 0.0
    if not gflops > 0:
        raise CalibrationError(f"host calibration failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}")
    entries[key] = {"core_gflops": gflops, "size": result.get("size"), "samples": result.get("samples")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # several emulated devices may calibrate at once
        tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "hosts": entries}, indent=2) + "\n", encoding="utf-8")
        tmp.replace(cache)
    except OSError:  # an unwritable home only costs a re-measurement next time
        pass
    return gflops
