"""Faults with real processes: a device killed mid-round, the server killed mid-round, a broker restart."""

from __future__ import annotations

import json
import signal
import time

from tests.brokers import Mosquitto
from tests.federation import metrics, start_devices, start_server, stop_all, wait_for_rounds


def _wait_for_line(log, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} never appeared in {log}")


def test_device_killed_mid_round_then_rejoins(tiny_export, tmp_path):
    broker = Mosquitto(tmp_path).start()
    state, log = tmp_path / "state", tmp_path / "server.log"
    server = start_server(tiny_export, state, log, broker=broker.url,
                          extra=["--rounds", "3", "--min-devices", "3", "--min-updates", "2", "--local-steps", "150",
                                 "--round-deadline-s", "20"])
    devices = start_devices(broker.url, tiny_export, tmp_path, ["small", "small", "big"])
    try:
        _wait_for_line(log, "round 0: 3 participants")
        devices[2].send_signal(signal.SIGKILL)  # while it trains round 0
        first = wait_for_rounds(state, 1, timeout=60, server=server)[0]
        assert first["updates"] == 2 and "dev2" in first["failed"]
        devices[2:] = start_devices(broker.url, tiny_export, tmp_path, ["big"], first=2)  # same id and state
        records = wait_for_rounds(state, 3, timeout=120, server=server)
        assert any(r["updates"] == 3 for r in records[1:]), records  # the device rejoined a later round
        assert server.wait(timeout=30) == 0
    finally:
        stop_all(devices + [server])
        broker.kill()


def test_server_killed_mid_round_resumes_without_double_counting(tiny_export, tmp_path):
    broker = Mosquitto(tmp_path).start()
    state, log = tmp_path / "state", tmp_path / "server.log"
    args = ["--rounds", "4", "--min-devices", "2", "--min-updates", "2", "--local-steps", "1000"]
    server = start_server(tiny_export, state, log, broker=broker.url, extra=args)
    devices = start_devices(broker.url, tiny_export, tmp_path, ["small", "big"])
    try:
        wait_for_rounds(state, 1, timeout=60, server=server)
        _wait_for_line(log, "round 1: 2 participants")
        server.send_signal(signal.SIGKILL)  # mid-round 1
        server.wait(timeout=10)
        committed = json.loads((state / "state.json").read_text())["round"]
        assert committed in (1, 2)
        server = start_server(tiny_export, state, log, broker=broker.url, extra=args)
        records = wait_for_rounds(state, 4, timeout=120, server=server)
        assert server.wait(timeout=30) == 0
        assert [r["round"] for r in records] == [0, 1, 2, 3]  # each completed round exactly once
        assert all(r["updates"] == 2 for r in records)
        assert f"resuming at round {committed}" in log.read_text()
    finally:
        stop_all(devices + [server])
        broker.kill()


def test_broker_restart_everyone_reconnects(tiny_export, tmp_path):
    broker = Mosquitto(tmp_path).start()
    state, log = tmp_path / "state", tmp_path / "server.log"
    server = start_server(tiny_export, state, log, broker=broker.url,
                          extra=["--rounds", "3", "--min-devices", "2", "--min-updates", "2"])
    devices = start_devices(broker.url, tiny_export, tmp_path, ["small", "big"])
    try:
        wait_for_rounds(state, 1, timeout=60, server=server)
        broker.restart(pause=1.0)
        records = wait_for_rounds(state, 3, timeout=120, server=server)
        assert server.wait(timeout=30) == 0
        assert [r["round"] for r in records] == [0, 1, 2] and all(r["updates"] == 2 for r in records)
        assert len(metrics(state)) == 3
    finally:
        stop_all(devices + [server])
        broker.kill()
