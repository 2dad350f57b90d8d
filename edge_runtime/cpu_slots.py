"""Host CPU slots: emulated devices sharing one host take turns on its cores instead of time-slicing.

An emulated device's compute time comes from the CPU time its training used (`emulation.py`). When
more device processes train at once than the host has cores, the kernel time-slices them, and every
switch makes a process refill caches another one evicted: the same work then costs more CPU time
(`fftmoe bench emulation` measures it: 4 devices without slots against one alone, side by side). So
emulated devices hold one slot per ORT thread while they train, and there are as many slots as
cores this process may run on; a device that finds none free waits (in wall time, which emulation
does not count). The same work then reports about the same CPU time whether 1 or 8 devices share
the host (the same bench, with slots).

Slots are `flock` locks on files in one folder per user (`FFTMOE_CPU_SLOTS_DIR` overrides it), so
every emulated device on the host shares them whoever started it, and the kernel releases a slot
when its holder exits, even by kill -9: a crashed device never leaves a core locked. A gate lock
makes acquisition first-come first-served, so a 2-thread device is not starved by 1-thread ones.
Linux and macOS (fcntl); this is not a scheduler for real devices, which own their cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

POLL_S = 0.005  # between attempts: short next to a training step (tens of ms), negligible CPU


def host_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_folder() -> Path:
    return Path(os.environ.get("FFTMOE_CPU_SLOTS_DIR")
                or Path(tempfile.gettempdir()) / f"fftmoe-cpu-slots-{os.getuid()}")


class CpuSlots:
    """`hold(n)` takes n of the host's core slots for the duration of a `with` block."""

    def __init__(self, folder: str | Path | None = None, slots: int | None = None):
        self.folder = Path(folder) if folder is not None else default_folder()
        self.slots = max(1, slots if slots is not None else host_cores())
        self.folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def hold(self, count: int, should_stop: Callable[[], bool] = lambda: False) -> Iterator[float]:
        """Wait for `count` slots (at most all of them), yield the seconds waited, release on exit.

        If `should_stop()` turns true while waiting, yields -1.0 without holding any slot."""
        count = max(1, min(count, self.slots))
        started, held = time.monotonic(), {}  # slot index -> its locked descriptor
        try:
            with self._lock("gate", should_stop) as gate:
                while gate and len(held) < count and not should_stop():
                    for k in range(self.slots):
                        if len(held) < count and k not in held and (fd := self._try(f"slot-{k}")) is not None:
                            held[k] = fd
                    if len(held) < count:
                        time.sleep(POLL_S)
            yield time.monotonic() - started if len(held) == count else -1.0
        finally:
            for fd in held.values():
                os.close(fd)  # closing the descriptor drops its flock

    @contextlib.contextmanager
    def _lock(self, name: str, should_stop: Callable[[], bool]) -> Iterator[bool]:
        """Hold lock `name` (polling, so a stop request is seen); yields False if stopped first."""
        fd = None
        while fd is None and not should_stop():
            fd = self._try(name)
            if fd is None:
                time.sleep(POLL_S)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def _try(self, name: str) -> int | None:
        fd = os.open(self.folder / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None
