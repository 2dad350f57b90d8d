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
