"""Host core slots: at most `slots` holders at once, across processes; a killed holder frees its slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from edge_runtime.cpu_slots import CpuSlots

HOLDER = """
import sys, time
from edge_runtime.cpu_slots import CpuSlots
with CpuSlots(sys.argv[1], slots=2).hold(int(sys.argv[2])) as waited:
    print(f"holding {time.monotonic()}", flush=True)
    time.sleep(float(sys.argv[3]))
print(f"released {time.monotonic()}", flush=True)
"""


def _holder(folder, count: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(count), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def _times(process: subprocess.Popen) -> tuple[float, float]:
    out = process.communicate(timeout=60)[0].split()
    assert process.returncode == 0
    return float(out[1]), float(out[3])


def test_no_more_holders_than_slots_across_processes(tmp_path):
    processes = [_holder(tmp_path, 1, 0.6) for _ in range(4)] + [_holder(tmp_path, 2, 0.3)]
    spans = [_times(p) for p in processes]
    for t, _ in spans:  # slots in use at every start: 1 per single holder, 2 for the double one
        in_use = sum(2 if i == 4 else 1 for i, (a, b) in enumerate(spans) if a <= t < b)
        assert in_use <= 2, spans
    assert spans[4][1] - spans[4][0] >= 0.3  # the 2-slot holder got its turn (not starved)


def test_killed_holder_releases_its_slot(tmp_path):
    slots = CpuSlots(tmp_path, slots=1)
    holder = _holder(tmp_path, 1, 60)  # slots=2 in the script, but it takes slot-0 first
    assert holder.stdout.readline().startswith("holding")
    blocker = _holder(tmp_path, 1, 60)  # takes slot-1
    assert blocker.stdout.readline().startswith("holding")
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with slots.hold(1) as waited:  # slot-0 is free again: no wait for the 60 s sleep
            assert 0 <= waited < 5 and time.monotonic() - started < 5
    finally:
        blocker.kill()
        blocker.wait(timeout=10)


def test_stop_while_waiting_yields_minus_one_and_holds_nothing(tmp_path):
    slots = CpuSlots(tmp_path, slots=1)
    stop = threading.Event()
    with slots.hold(1) as first:
        assert first >= 0
        threading.Timer(0.2, stop.set).start()
        with slots.hold(1, should_stop=stop.is_set) as second:
            assert second == -1.0
    with slots.hold(5) as waited:  # clamped to the one slot there is, and free again
        assert waited >= 0


@pytest.mark.parametrize("count", [0, 3])
def test_count_is_clamped_to_one_and_the_slot_total(tmp_path, count):
    with CpuSlots(tmp_path, slots=2).hold(count) as waited:
        assert waited >= 0
