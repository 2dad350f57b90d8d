"""A round whose attempt fails is retried, and never waits forever for devices it will not use.

In-process aggregation server, embedded broker, seeded fake devices (tests/fake_devices.py)."""

from __future__ import annotations

import time

from broker_server.embedded_broker import EmbeddedBroker
from tests.fake_devices import FakeDevice
from tests.federation import metrics, serve_in_thread


def test_a_device_that_failed_an_attempt_is_taken_again_when_no_one_else_is_left(tiny_export, tmp_path):
    """Two devices, both needed. The first attempt fails (fake0 never answers its task); before,
    the retry waited for two devices besides fake0, which never came, and the round hung for good
    (found by tests/test_soak.py)."""
    with EmbeddedBroker(port=0) as embedded:
        devices = [FakeDevice(embedded.url, "retry", "fake0", "small", samples=20, ignore_tasks=1).start(),
                   FakeDevice(embedded.url, "retry", "fake1", "big", samples=27).start()]
        server, runner = serve_in_thread(tiny_export, embedded.url, tmp_path / "state", federation="retry",
                                         rounds=1, min_devices=2, min_updates=2, round_deadline_s=2, max_attempts=3)
        started = time.monotonic()
        runner.join(timeout=60)
        for device in devices:
            device.stop()
    assert not runner.is_alive(), "the round hung"
    records = metrics(tmp_path / "state")
    assert len(records) == 1 and time.monotonic() - started < 30
    assert records[0]["attempt"] == 2 and sorted(records[0]["devices"]) == ["fake0", "fake1"]
    assert devices[0].tasks_seen == 2


def test_a_round_waiting_for_a_device_that_is_gone_says_so_and_goes_on_when_the_quorum_is_lowered(
        tiny_export, tmp_path, caplog, monkeypatch):
    """min_devices 3 with two devices online: the round waits and logs what it waits for; lowering
    server.min_devices (what `fftmoe run` does when an emulated device's process dies) lets it run."""
    import logging

    from broker_server.server import AggregationServer

    caplog.set_level(logging.INFO, logger="fftmoe.server")
    monkeypatch.setattr(AggregationServer, "QUORUM_LOG_EVERY_S", 0.5)
    with EmbeddedBroker(port=0) as embedded:
        devices = [FakeDevice(embedded.url, "gone", f"fake{i}", "small", samples=20).start() for i in range(2)]
        server, runner = serve_in_thread(tiny_export, embedded.url, tmp_path / "state", federation="gone",
                                         rounds=1, min_devices=3, round_deadline_s=10)
        time.sleep(2.0)
        assert runner.is_alive() and not (tmp_path / "state" / "metrics.jsonl").exists()
        server.min_devices = 2
        runner.join(timeout=60)
        for device in devices:
            device.stop()
    assert not runner.is_alive(), "the round still waited for the third device"
    assert "round 0: waiting for devices: 2 of 3 online" in caplog.text
    assert len(metrics(tmp_path / "state")) == 1
