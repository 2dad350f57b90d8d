"""Soak: a real federation under random faults, with nothing lost (bounded to a few minutes, loopback only).

Debian mosquitto, a real `fftmoe serve` on a state folder, three real devices. While rounds run,
seeded random faults: devices killed (SIGKILL) and restarted at random moments, the server killed
twice and restarted on the same state folder, the broker restarted once. At the end every committed
round is in the folder exactly once, the final global state loads and is consistent with the
export, and every live device stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import time

import numpy as np
import pytest

from broker_server.state import StateStore
from tests.brokers import Mosquitto
from broker_server import audit
from broker_server.aggregation import AggregationConfig
from tests.federation import metrics, start_devices, start_server, stop_all

ROUNDS = 8
MIN_UPDATES = 2
TIERS = ["small", "small", "big"]
WALL_LIMIT_S = 170.0


@pytest.mark.slow
def test_soak_random_faults_nothing_lost(tiny_export, tmp_path):
    rng = random.Random(20240607)
    started = time.monotonic()
    broker = Mosquitto(tmp_path).start()
    state, log = tmp_path / "state", tmp_path / "server.log"
    args = ["--rounds", str(ROUNDS), "--min-devices", str(MIN_UPDATES), "--min-updates", str(MIN_UPDATES),
            "--local-steps", "1500", "--round-deadline-s", "15", "--seed", "7", "--audit-log"]
    server = start_server(tiny_export, state, log, broker=broker.url, extra=args)
    devices = start_devices(broker.url, tiny_export, tmp_path, TIERS)
    log_offsets = [0] * len(devices)  # where each device's current process starts in its log
    faults = {"device kills": 0, "server kills": 0, "broker restarts": 0}
    # The server and broker faults are tied to committed rounds (so they happen mid-run for sure),
    # at a random moment inside the following round; device kills are sprinkled at random throughout.
    planned = {2: "server", 4: "broker", 5: "server"}
    done_planned: set[int] = set()

    def kill_device() -> None:
        i = rng.randrange(len(devices))
        devices[i].send_signal(signal.SIGKILL)
        devices[i].wait(timeout=10)
        faults["device kills"] += 1
        time.sleep(rng.uniform(0.0, 1.0))
        log_offsets[i] = (tmp_path / f"device-{i}.log").stat().st_size
        devices[i] = start_devices(broker.url, tiny_export, tmp_path, [TIERS[i]], first=i)[0]  # same id, state

    try:
        next_device_fault = time.monotonic() + rng.uniform(0.3, 1.0)
        while True:
            committed = len(metrics(state))
            if committed >= ROUNDS:
                break
            assert time.monotonic() - started < WALL_LIMIT_S, f"only {committed} rounds after {WALL_LIMIT_S} s"
            if server.poll() is not None:
                raise AssertionError(f"server exited with {server.returncode} after {committed} rounds:\n"
                                     + log.read_text()[-3000:])
            for at, what in planned.items():
                if committed >= at and at not in done_planned:
                    done_planned.add(at)
                    time.sleep(rng.uniform(0.1, 1.0))  # a random moment within the round
                    if what == "server":
                        server.send_signal(signal.SIGKILL)
                        server.wait(timeout=10)
                        faults["server kills"] += 1
                        time.sleep(rng.uniform(0.0, 1.0))
                        server = start_server(tiny_export, state, log, broker=broker.url, extra=args)
                    else:
                        broker.restart(pause=rng.uniform(0.5, 1.5))
                        faults["broker restarts"] += 1
            if time.monotonic() >= next_device_fault and committed < ROUNDS - 1:
                kill_device()
                next_device_fault = time.monotonic() + rng.uniform(0.3, 1.5)
            time.sleep(0.1)

        assert server.wait(timeout=60) == 0  # --rounds reached: the server exits by itself
        assert faults["server kills"] == 2 and faults["broker restarts"] == 1 and faults["device kills"] >= 2, faults

        # Every committed round is in the folder exactly once.
        records = metrics(state)
        assert [r["round"] for r in records] == list(range(ROUNDS)), [r["round"] for r in records]
        meta = json.loads((state / "state.json").read_text())
        assert meta["round"] == ROUNDS
        assert sorted(p.name for p in state.glob("global-*.npz")) == [f"global-{ROUNDS:06d}.npz"]
        lost = 0
        for r in records:
            assert r["updates"] >= MIN_UPDATES, r
            ok = sorted(d for d, info in r["devices"].items() if info["status"] == "ok")
            assert len(ok) == r["updates"], r  # each counted update is a participant that answered, once
            assert not set(ok) & set(r["failed"]), r
            lost += r["participants"] - r["updates"] - len(r["failed"])  # participants neither ok nor failed
        assert lost == 0

        # The final global state loads (through the same code the server resumes with) and matches the export.
        final = StateStore(state).load()
        assert final.round == ROUNDS
        with np.load(tiny_export.root / tiny_export.global_init.path, allow_pickle=False) as init:
            initial = {name: init[name] for name in init.files}
        assert final.global_arrays.keys() == initial.keys()
        for name, value in initial.items():
            assert final.global_arrays[name].shape == value.shape, name
            assert np.isfinite(final.global_arrays[name]).all(), name
        changed = [n for n in initial if not np.array_equal(final.global_arrays[n], initial[n])]
        assert changed, "no global array changed after training"
        # ...and equals, bit for bit, a replay of the logged aggregation inputs (across every kill).
        replayed = audit.replay(state, tiny_export, AggregationConfig(), ROUNDS)
        for name, value in final.global_arrays.items():
            np.testing.assert_array_equal(replayed[name], value, err_msg=name)
        assert sum(len(list(audit.round_folder(state, r).glob("*.npz"))) for r in range(ROUNDS)) == \
            sum(r["updates"] for r in records)  # each counted update logged once

        # No device is stuck: every one still alive stops cleanly on SIGTERM.
        for i in range(len(devices)):  # a just-restarted process has not installed its SIGTERM handler yet
            deadline = time.monotonic() + 30
            while b"connected to" not in (tmp_path / f"device-{i}.log").read_bytes()[log_offsets[i]:]:
                assert time.monotonic() < deadline, f"device {i} never connected after its restart"
                time.sleep(0.1)
        alive = [p for p in devices if p.poll() is None]
        assert len(alive) == len(devices), [p.returncode for p in devices]
        for p in alive:
            p.terminate()
        codes = [p.wait(timeout=30) for p in alive]
        assert codes == [0] * len(alive), codes

        wall = time.monotonic() - started
        print(f"\nSOAK: {ROUNDS} rounds committed, each exactly once (0 missing, 0 duplicated); faults injected: "
              f"{faults['device kills']} device kills, {faults['server kills']} server kills, "
              f"{faults['broker restarts']} broker restart ({sum(faults.values())} total); "
              f"updates {sum(r['updates'] for r in records)} of {sum(r['participants'] for r in records)} "
              f"participants (failed: {sum(len(r['failed']) for r in records)}, unaccounted: {lost}); "
              f"{len(changed)}/{len(initial)} global arrays changed; {wall:.0f} s wall")
    finally:
        stop_all(devices + [server])
        broker.kill()
