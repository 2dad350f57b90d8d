"""Device-side emulation of a hardware profile, for running a Pi / Jetson fleet on one laptop.

Applied to a real device agent (`fftmoe device run --emulate PROFILE`), never a stand-in:
- ORT threads limited to the profile's cores (and the host's);
- a memory ceiling: a watchdog samples this process's resident memory and, past the profile's
  usable RAM, kills the process with exit code 137 and no goodbye, as the kernel's OOM killer would;
- the link: every task received and update sent is delayed by latency + bytes / bandwidth;
- availability: each round the device drops out (goes offline for that round) with probability
  1 - availability, drawn from a seeded generator;
- emulated time: compute time = this process's CPU seconds x host core speed / (profile core speed
  x threads). CPU time, unlike wall time, does not grow with the number of devices sharing the
  host's cores, provided they do not time-slice those cores (which costs cache refills): so a device
  trains only while it holds one host core slot per thread (`cpu_turn`, `cpu_slots.py`), and
  reported times do not depend on how many devices run at once. ORT's spinning worker threads would
  burn CPU time while idle, so emulation turns spinning off.
The profile files live in `hw_profiles/profiles/`; this module reads only the fields it applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:  # only for the annotation: this module's arithmetic needs no numpy
    import numpy as np

log = logging.getLogger("fftmoe.emulation")

OOM_EXIT_CODE = 137  # 128 + SIGKILL, what a shell reports for an OOM-killed process
_FIELDS = ("cpu_cores", "ram_mb", "os_reserved_mb", "core_gflops", "uplink_mbps", "downlink_mbps", "latency_ms",
           "availability")


def device_seconds(host_cpu_seconds: float, host_core_gflops: float, core_gflops: float, cores: int) -> float:
    """Emulated wall time on a device of work that took `host_cpu_seconds` of this host's CPU.

    The work (host CPU seconds x host core speed) is spread over the device's cores in use,
    assuming linear thread scaling. The one formula for both emulated devices and tier mapping.
    """
    return host_cpu_seconds * host_core_gflops / (core_gflops * max(1, cores))


def link_seconds(nbytes: int, mbps: float, latency_ms: float) -> float:
    """Seconds to move `nbytes` over a link: one-way latency + bits / bandwidth."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)


class EmulationError(ValueError):
    """A profile cannot be applied (missing file, missing or bad field)."""


@dataclass(frozen=True)
class Emulation:
    profile: str
    cpu_cores: int
    memory_limit_mb: float  # usable RAM: the profile's RAM minus what its OS keeps
    core_gflops: float  # one core of the emulated device
    host_core_gflops: float  # one core of this host (calibrated by the caller)
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    availability: float

    @classmethod
    def from_profile_file(cls, path: str | Path, host_core_gflops: float,
                          memory_limit_mb: float | None = None) -> "Emulation":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise EmulationError(f"cannot read hardware profile {path}: {err}") from err
        missing = [k for k in _FIELDS if not isinstance(data.get(k), (int, float)) or isinstance(data.get(k), bool)]
        if missing:
            raise EmulationError(f"hardware profile {path}: missing or non-numeric {missing}")
        if host_core_gflops <= 0:
            raise EmulationError("host_core_gflops must be positive (calibrate the host first)")
        limit = memory_limit_mb if memory_limit_mb is not None else data["ram_mb"] - data["os_reserved_mb"]
        return cls(profile=str(data.get("name", path.stem)), cpu_cores=int(data["cpu_cores"]),
                   memory_limit_mb=float(limit), core_gflops=float(data["core_gflops"]),
                   host_core_gflops=float(host_core_gflops), uplink_mbps=float(data["uplink_mbps"]),
                   downlink_mbps=float(data["downlink_mbps"]), latency_ms=float(data["latency_ms"]),
                   availability=float(data["availability"]))

    def threads(self, requested: int) -> int:
        return max(1, min(requested, self.cpu_cores, os.cpu_count() or 1))

    def compute_seconds(self, cpu_seconds: float, threads: int) -> float:
        """Emulated wall time of work that took `cpu_seconds` of this host's CPU on `threads` threads."""
        return device_seconds(cpu_seconds, self.host_core_gflops, self.core_gflops, min(threads, self.cpu_cores))

    def transfer_seconds(self, nbytes: int, upload: bool) -> float:
        return link_seconds(nbytes, self.uplink_mbps if upload else self.downlink_mbps, self.latency_ms)

    def drops_out(self, rng: "np.random.Generator") -> bool:
        return bool(rng.random() >= self.availability)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resident_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; 0 where unavailable)."""
    return _status_mb("VmRSS:") or 0.0


def peak_resident_mb() -> float:
    """Peak resident set size of this process in MB.

    On Linux this reads VmHWM, the high-water mark of the current address space. `ru_maxrss` is
    not used there because Linux carries it over from the parent across fork and exec, so a probe
    started by a 1.5 GB export process would report 1.5 GB.
    """
    peak = _status_mb("VmHWM:")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024


class MemoryWatchdog:
    """Kills the process (exit 137) when its resident memory passes `limit_mb`."""

    def __init__(self, limit_mb: float, interval_s: float = 0.02, on_kill=None):
        self.limit_mb = limit_mb
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._on_kill = on_kill or self._kill
        self._stop = threading.Event()

    def start(self) -> "MemoryWatchdog":
        threading.Thread(target=self._watch, daemon=True, name="memory-watchdog").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = resident_mb()
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.limit_mb:
                self._on_kill(rss)
                return

    def _kill(self, rss: float) -> None:
        sys.stderr.write(f"emulated out-of-memory kill: resident {rss:.0f} MB exceeds the profile's "
                         f"{self.limit_mb:.0f} MB\n")
        sys.stderr.flush()
        os._exit(OOM_EXIT_CODE)


def cpu_turn(emulation: Emulation | None, threads: int, should_stop=lambda: False):
    """Context manager around a round's training: under emulation, wait for `threads` of the host's
    core slots (`cpu_slots.py`) and yield the seconds waited (-1.0: stopped while waiting); without
    emulation a real device owns its cores and this yields 0.0 at once."""
    if emulation is None:
        return contextlib.nullcontext(0.0)
    from edge_runtime.cpu_slots import CpuSlots  # fcntl: imported only where emulation runs

    return CpuSlots().hold(threads, should_stop)


def sleep_transfer(emulation: Emulation | None, nbytes: int, upload: bool) -> float:
    """Delay for an emulated link; returns the emulated transfer seconds (0 without emulation)."""
    if emulation is None:
        return 0.0
    seconds = emulation.transfer_seconds(nbytes, upload)
    time.sleep(seconds)
    return seconds
