"""Sharded aggregation with real processes on 127.0.0.1: a coordinator (`fftmoe serve --workers 2`),
two `fftmoe serve --worker` processes and mosquitto, against seeded fake devices (tests/fake_devices.py)
so the same updates reach every federation. The global model must be bit for bit what one exact
aggregator computes, also when a worker is killed with SIGKILL in the middle of a round."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.brokers import Mosquitto
from tests.fake_devices import start_fake_fleet
from tests.federation import start_server, stop_all, wait_for_rounds

TIERS = ["small", "big", "small", "big"]


def _global(state):
    meta = json.loads((state / "state.json").read_text())
    with np.load(state / meta["global_file"], allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _worker(manifest, url: str, federation: str, name: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fftmoe.cli", "serve", "--worker", "--worker-name", name, "--artifacts",
           str(manifest.root), "--broker", url, "--federation", federation]
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def _wait_for_line(path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not in {path} after {timeout} s")


def _federation(manifest, tmp, url, name, serve_flags, workers=(), delays=None, kill=None):
    """Run two rounds; returns (global arrays, metrics records, server log text). `kill`: a worker to
    SIGKILL once it aggregates round 0, or "coordinator" to SIGKILL the server then and restart it."""
    state, log = tmp / f"{name}-state", tmp / f"{name}-server.log"
    flags = ["--federation", name, "--rounds", "2", "--min-devices", "4", "--min-updates", "4", *serve_flags]
    server = start_server(manifest, state, log, broker=url, extra=flags)
    procs = [_worker(manifest, url, name, w, tmp / f"{name}-{w}.log") for w in workers]
    devices = start_fake_fleet(url, name, TIERS, delays)
    try:
        if kill == "coordinator":  # mid-round: the devices are still "training", workers hold nothing yet
            _wait_for_line(log, "round 0: 4 participants over 2 workers")
            server.kill()
            server.wait()
            server = start_server(manifest, state, log, broker=url, extra=flags)
        elif kill is not None:  # SIGKILL a worker once it is aggregating round 0 (its devices are still "training")
            _wait_for_line(tmp / f"{name}-{kill}.log", "round 0: aggregating")
            procs[list(workers).index(kill)].kill()
        records = wait_for_rounds(state, 2, timeout=120, server=server)
        assert server.wait(timeout=30) == 0, log.read_text()[-3000:]
        return _global(state), records, log.read_text()
    finally:
        for d in devices:
            d.stop()
        stop_all(procs + [server])


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.kill()


def test_two_workers_give_the_bits_of_one_exact_aggregator(tiny_export, tmp_path, mosquitto):
    single, single_records, _ = _federation(tiny_export, tmp_path, mosquitto.url, "one", ["--exact"])
    sharded, records, log = _federation(tiny_export, tmp_path, mosquitto.url, "two", ["--workers", "2"],
                                        workers=["wa", "wb"])
    assert [r["updates"] for r in records] == [4, 4] == [r["updates"] for r in single_records]
    assert all(r["bytes_up"] > 0 for r in records)
    assert sorted(single) == sorted(sharded)
    assert all(single[k].tobytes() == sharded[k].tobytes() for k in single), \
        [k for k in single if single[k].tobytes() != sharded[k].tobytes()]
    assert "over 2 workers" in log
    # the float32 default is the same rule rounded differently: close, and the exact run is not a stub
    plain, _, _ = _federation(tiny_export, tmp_path, mosquitto.url, "plain", [])
    for k in single:
        np.testing.assert_allclose(plain[k], single[k], rtol=1e-5, atol=1e-6)
    assert any(plain[k].tobytes() != single[k].tobytes() for k in single)


def test_a_worker_killed_mid_round_loses_nothing(tiny_export, tmp_path, mosquitto):
    single, _, _ = _federation(tiny_export, tmp_path, mosquitto.url, "ref", ["--exact"])
    delays = [2.0] * len(TIERS)  # every device answers 2 s after its task: the kill lands mid-round
    sharded, records, log = _federation(tiny_export, tmp_path, mosquitto.url, "kill", ["--workers", "2"],
                                        workers=["wa", "wb"], delays=delays, kill="wa")
    assert "aggregator worker wa went offline; handing its 2 devices to another worker" in log
    assert [r["updates"] for r in records] == [4, 4] and not records[0]["failed"]
    assert all(single[k].tobytes() == sharded[k].tobytes() for k in single)


def test_a_coordinator_killed_mid_round_resumes_without_double_counting(tiny_export, tmp_path, mosquitto):
    single, _, _ = _federation(tiny_export, tmp_path, mosquitto.url, "ref2", ["--exact"])
    delays = [1.5] * len(TIERS)
    sharded, records, log = _federation(tiny_export, tmp_path, mosquitto.url, "restart", ["--workers", "2"],
                                        workers=["wa", "wb"], delays=delays, kill="coordinator")
    assert log.count("round 0: 4 participants over 2 workers") == 2  # round 0 ran again, in a new session
    assert [r["round"] for r in records] == [0, 1] and [r["updates"] for r in records] == [4, 4]
    assert all(single[k].tobytes() == sharded[k].tobytes() for k in single)  # each update counted once


def test_bad_sharding_flags_fail_with_a_clear_message(tiny_export, tmp_path):
    def serve(*flags):
        return subprocess.run([sys.executable, "-m", "fftmoe.cli", "serve", "--artifacts", str(tiny_export.root),
                               "--state-dir", str(tmp_path / "state"), *flags], capture_output=True, text=True,
                              timeout=60)

    cases = [(["--worker"], "a worker connects to its coordinator's broker: give --broker"),
             (["--worker", "--broker", "mqtt://127.0.0.1:1", "--workers", "2"], "--worker and --workers exclude"),
             (["--workers", "2", "--audit-log"], "audit_log needs the updates in this process"),
             (["--workers", "-1"], "workers must be >= 0"),
             (["--workers", "2", "--method", "fedit"], "exact, workers, audit_log")]
    for flags, message in cases:
        done = serve(*flags)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr[-500:])
    assert not (tmp_path / "state").exists()  # nothing was created on the way to the error
