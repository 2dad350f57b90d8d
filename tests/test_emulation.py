"""Emulated time: from CPU time, so it does not depend on how many emulated devices share the host."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.cpu_slots import host_cores
from edge_runtime.emulation import Emulation, EmulationError, MemoryWatchdog
from hw_profiles.emulation_work import run_copies

PROFILE = """
name = "test-board"
cpu_cores = 4
ram_mb = 1024
os_reserved_mb = 224
core_gflops = 2.0
uplink_mbps = 8.0
downlink_mbps = 40.0
latency_ms = 20.0
availability = 0.75
"""


@pytest.fixture()
def profile_file(tmp_path) -> Path:
    path = tmp_path / "board.toml"
    path.write_text(PROFILE)
    return path


def _emulated(emulation: Emulation, records: list[dict]) -> float:
    """Median emulated seconds of the copies' training (from their CPU seconds, as devices report it)."""
    return statistics.median(emulation.compute_seconds(r["cpu_seconds"], threads=1) for r in records)


def test_same_work_same_emulated_time_with_1_or_4_devices(tiny_export, profile_file, tmp_path):
    """Devices that took turns on the host's cores report about the emulated time of a device alone,
    while their elapsed time grew. Loose bounds: with other load on the host, 2 of these devices on the
    cores at once pay more for it than 1 does (the crowd's median +11% to +57%, its fastest device +9%
    to +41%, over runs of this work while a benchmark grid held the load average at 3-6 on 2 cores).
    How close the times stay is a measurement, `fftmoe bench emulation`, not this test."""
    emulation = Emulation.from_profile_file(profile_file, host_core_gflops=10.0)
    steps, devices = 1000, 4
    alone = run_copies(tiny_export.root, "big", steps, 1, tmp_path)[0]
    crowded = run_copies(tiny_export.root, "big", steps, devices, tmp_path)
    alone_s, crowded_s = _emulated(emulation, [alone]), _emulated(emulation, crowded)
    # other load only adds CPU time, so the crowd's least disturbed device shows what crowding costs.
    # Below 1.8x: from wall time, 4 devices time-slicing 2 cores all report 2x idle (half a core each), 5x+ loaded
    assert min(_emulated(emulation, [r]) for r in crowded) / alone_s < 1.8, (alone, crowded)
    if host_cores() < devices:  # more devices than cores: some waited for a core slot instead of time-slicing
        waited = [r for r in crowded if r["waited_s"] > 0.5 * alone["cpu_seconds"]]
        assert waited, crowded
        at_once = [r for r in crowded if r not in waited]
        # the wait is not emulated time: a device that waited a whole turn reports what one that did not
        # (both ran in this crowd, under the same load), though its elapsed time doubled
        assert abs(_emulated(emulation, waited) / _emulated(emulation, at_once) - 1) < 0.5, crowded
    print(f"emulated alone {alone_s:.3f} s, crowded {crowded_s:.3f} s")


def test_profile_arithmetic(profile_file):
    e = Emulation.from_profile_file(profile_file, host_core_gflops=10.0)
    assert e.memory_limit_mb == 800 and e.threads(8) <= 4
    assert e.compute_seconds(4.0, threads=4) == pytest.approx(4.0 * 10.0 / (2.0 * 4))
    assert e.transfer_seconds(1_000_000, upload=True) == pytest.approx(0.02 + 8e6 / 8e6)
    assert e.transfer_seconds(1_000_000, upload=False) == pytest.approx(0.02 + 8e6 / 40e6)
    drops = np.mean([e.drops_out(np.random.default_rng(s)) for s in range(2000)])
    assert drops == pytest.approx(0.25, abs=0.04)


def test_bad_profile_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(PROFILE.replace("core_gflops = 2.0", 'core_gflops = "fast"'))
    with pytest.raises(EmulationError, match="bad.toml: missing or non-numeric \\['core_gflops'\\]"):
        Emulation.from_profile_file(bad, host_core_gflops=10.0)


def test_memory_watchdog_fires_past_the_ceiling():
    fired = []
    watchdog = MemoryWatchdog(limit_mb=1.0, interval_s=0.005, on_kill=fired.append).start()
    import time
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.01)
    watchdog.stop()
    assert fired and fired[0] > 1.0  # this test process is far above 1 MB
