"""What limits `fftmoe bench fleet`: the aggregator's own capacity, and how busy the host's cores are.

On a loopback bench the publishers, the broker and the aggregator share the host's cores. When the
aggregating pass is slower than the broker-only pass, that can mean the aggregator cannot keep up,
or that its work took cores the broker and the publishers needed. Two measurements tell them apart:
- `aggregator_capacity`: the aggregator's main-path work per upload (the server's `UploadReceiver`
  reassembly, sha256 and decode; the `ClientUpdate`; `validate_update`; the fold) on encoded uploads
  already in memory, no broker and no sockets: process CPU per update, so updates/s one core can
  aggregate. It leaves out the MQTT client's socket reads, which the broker-only counter pays too.
- `HostCpu`: the share of all the host's cores busy between two points (/proc/stat; None elsewhere),
  so each pass says whether the host was saturated.
- `reserve_cores`: with `--aggregator-cores K`, the subscribers (the broker-only counter, the
  aggregator, sharded workers and their coordinator) run on the host's last K cores and the broker and
  publishers on the others, for both passes alike: an aggregator with cores of its own, as deployed
  (deploy/mosquitto-bridge/README.md), measured end to end.
If capacity is well above the broker-only rate while the aggregating pass has the host at ~100%,
the aggregator keeps up with the broker and the shortfall is cores shared on this host.
This is part of a benchmark, never a timed test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from broker_server.aggregation import AggregationConfig, FftMoeStrategy
from broker_server.methods import client_update
from broker_server.receiver import UploadReceiver
from broker_server.update_checks import validate_update
from edge_runtime import wire

_PROC_STAT = Path("/proc/stat")


class BenchFold:
    """The aggregation server's main-thread work on one upload of the bench's fleet: the `ClientUpdate`
    (`methods.client_update`, as the server makes it), `validate_update` against the tier's shapes,
    then the fold."""

    def __init__(self, space, slots: int, layers, seed: int, slot_map_of):
        self.space, self.slots, self.layers, self._slot_map_of = space, slots, tuple(layers), slot_map_of
        self.expected = space.tier_shapes(self.layers, slots)
        rng = np.random.default_rng(seed)
        global_arrays = {p.name: (rng.standard_normal(p.shape) * 0.02).astype(np.float32) for p in space.entries}
        self.strategy = FftMoeStrategy(space, AggregationConfig())
        self.strategy.begin_round(global_arrays)

    def __call__(self, message: wire.Update, index: int) -> bool:
        """Fold simulated device `index`'s update; False when validation refuses it."""
        update = client_update(message, self._slot_map_of(index, self.slots, self.layers, self.space.experts))
        if validate_update(update, self.expected, self.space.experts):
            return False
        self.strategy.fold(update)
        return True


def aggregator_capacity(fold: BenchFold, uploads: list[tuple[str, list[bytes]]], repeats: int = 3) -> dict:
    """Updates/s one core aggregates: `uploads` ((topic, chunks) per device, device i at index i) through
    a fresh `UploadReceiver` and `fold`, `repeats` times; the least CPU per update is reported (load on
    a shared host only ever adds to it)."""
    best = float("inf")
    for _ in range(repeats):
        receiver = UploadReceiver(lambda: 0, max_queued=len(uploads) + 1)
        start = time.process_time()
        for i, (topic, chunks) in enumerate(uploads):
            for chunk in chunks:
                receiver(topic, chunk, _no_ack)
            message, ack = receiver.inbox.get_nowait()
            if not fold(message, i):
                raise RuntimeError(f"capacity pass: the update of {message.device_id} failed validation")
            ack()
        best = min(best, (time.process_time() - start) / len(uploads))
    return {"aggregator_cpu_ms_per_update": round(1e3 * best, 3),
            "aggregator_capacity_updates_per_s": round(1 / best, 1) if best > 0 else None}


def _no_ack() -> None:
    pass


class HostCpu:
    """`HostCpu()` then `.busy()`: the share of all cores busy since (0..1), or None without /proc/stat."""

    def __init__(self):
        self._start = _cpu_times()

    def busy(self) -> float | None:
        end = _cpu_times()
        if self._start is None or end is None:
            return None
        total = end[0] - self._start[0]
        return round(1 - (end[1] - self._start[1]) / total, 3) if total > 0 else None


def _cpu_times() -> tuple[int, int] | None:
    """(all jiffies, idle + iowait jiffies) over every core, from /proc/stat's first line."""
    try:
        fields = _PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    return sum(values), values[3] + values[4]


def reserve_cores(count: int) -> set[int]:
    """The last `count` of the cores this process may run on, for the subscribers. Moves this process
    (and so the broker and publishers it starts later) onto the others. ValueError when the host
    cannot pin (not Linux) or has no core left over."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--aggregator-cores needs a Linux host (sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))
    if not 0 < count < len(cores):
        raise ValueError(f"--aggregator-cores {count}: this process may use {len(cores)} core(s); "
                         f"reserve at least 1 and leave at least 1 for the broker and publishers")
    os.sched_setaffinity(0, set(cores[:-count]))
    return set(cores[-count:])
