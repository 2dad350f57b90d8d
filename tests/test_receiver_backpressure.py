"""The aggregator's receive path keeps its backlog bounded against a real mosquitto, which does not
keep its own in-flight window once acknowledgements flow (broker_server/receiver.py)."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from broker_server.receiver import UploadReceiver
from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig, MqttConnection
from broker_server.embedded_broker import EmbeddedBroker
from tests.brokers import Mosquitto
from tests.fake_devices import start_fake_fleet
from tests.federation import serve_in_thread

FED = "bp"
MESSAGES = 150


@pytest.fixture()
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.kill()


def _connection(broker, client_id, subscriptions, on_message, manual_ack=False) -> MqttConnection:
    conn = MqttConnection(BrokerConfig.from_url(broker.url), client_id, subscriptions, on_message,
                          manual_ack=manual_ack)
    conn.start()
    assert conn.wait_connected(timeout=10)
    return conn


def _update(device: str) -> wire.Update:
    return wire.Update(device_id=device, round=0, tier="nano", params={"w": np.ones((4, 8), np.float32)},
                       expert_tokens={"0": [3, 1]}, num_samples=8)


def _publish_updates(broker, count: int) -> MqttConnection:
    """`count` small device updates, QoS 1, as fast as the broker takes them."""
    devices = _connection(broker, "publisher", [], lambda *_: None)
    for i in range(count):
        devices.publish_nowait(wire.upload_topic(FED, f"d{i}", 0), wire.encode(_update(f"d{i}")))
    return devices


def _aggregator(broker, receiver) -> MqttConnection:
    return _connection(broker, "aggregator", [(wire.upload_subscription(FED), 1)], receiver, manual_ack=True)


def test_a_slow_consumer_holds_at_most_max_queued_messages(broker):
    receiver = UploadReceiver(lambda: 0, max_queued=8)
    aggregator = _aggregator(broker, receiver)
    devices = _publish_updates(broker, MESSAGES)
    seen, deepest = set(), 0
    try:
        while len(seen) < MESSAGES:
            deepest = max(deepest, receiver.unfinished)
            message, ack = receiver.inbox.get(timeout=20)
            time.sleep(0.003)  # the main thread's work on it
            seen.add(message.device_id)
            ack()
    finally:
        devices.stop()
        aggregator.stop()
    assert len(seen) == MESSAGES  # nothing lost: the backlog waited in the broker and the socket
    assert deepest <= 8 and receiver.overflows == 0


def test_without_the_bound_the_broker_floods_the_inbox(broker):
    """Why the bound exists: mosquitto 2.0 sends far past its window of 20 while acks trickle back."""
    receiver = UploadReceiver(lambda: 0, max_queued=10_000)
    aggregator = _aggregator(broker, receiver)
    devices = _publish_updates(broker, MESSAGES)
    deepest, got = 0, 0
    try:
        while got < MESSAGES:
            deepest = max(deepest, receiver.unfinished)
            _, ack = receiver.inbox.get(timeout=20)
            time.sleep(0.003)
            got += 1
            ack()
    finally:
        devices.stop()
        aggregator.stop()
    assert deepest > 40


def test_publishing_from_the_main_thread_with_a_full_inbox_does_not_deadlock(broker):
    """The main thread waits for a PUBACK that only the network thread can read: the receiver must
    queue past its bound meanwhile instead of blocking that thread."""
    connection: list[MqttConnection] = []
    receiver = UploadReceiver(lambda: 0, max_queued=2, busy=lambda: connection[0].awaiting_acks, max_wait_s=60)
    aggregator = _aggregator(broker, receiver)
    connection.append(aggregator)
    devices = _publish_updates(broker, 40)
    try:
        deadline = time.monotonic() + 20
        while receiver.unfinished < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert receiver.unfinished == 2  # full; the network thread now waits for room
        started = time.monotonic()
        assert aggregator.publish(wire.global_topic(FED), b"task", timeout=15)
        assert time.monotonic() - started < 5  # not the 60 s max_wait_s: busy() let messages through
        assert receiver.overflows >= 1
        got = 0
        while True:  # everything still arrives and is acknowledged
            try:
                _, ack = receiver.inbox.get(timeout=3)
            except queue.Empty:
                break
            got += 1
            ack()
        assert got == 40
    finally:
        devices.stop()
        aggregator.stop()


def test_updates_wait_for_the_main_thread_control_messages_are_acknowledged_on_arrival():
    receiver, acked = UploadReceiver(lambda: 0), []
    receiver(wire.upload_topic(FED, "d1", 0), wire.encode(_update("d1"))[0], lambda: acked.append("update"))
    presence = wire.Presence(device_id="d2", online=True, timestamp=0.0)
    receiver(wire.presence_topic(FED, "d2"), wire.encode(presence)[0], lambda: acked.append("presence"))
    assert acked == ["presence"] and receiver.unfinished == 2  # both still count against the bound
    for _ in range(2):
        _, finish = receiver.inbox.get_nowait()
        finish()
        finish()  # a second call changes nothing
    assert acked == ["presence", "update"] and receiver.unfinished == 0


def test_a_long_absent_main_thread_delays_messages_by_max_wait_s_at_most():
    receiver = UploadReceiver(lambda: 0, max_queued=1, max_wait_s=0.2)
    topic = wire.upload_topic(FED, "d1", 0)
    receiver(topic, wire.encode(_update("d1"))[0], lambda: None)
    waited = threading.Event()

    def second():
        receiver(topic, wire.encode(_update("d1"))[0], lambda: None)
        waited.set()
    started = time.monotonic()
    threading.Thread(target=second, daemon=True).start()
    assert waited.wait(timeout=5)
    assert 0.15 < time.monotonic() - started < 2 and receiver.overflows == 1 and receiver.inbox.qsize() == 2
    with pytest.raises(ValueError, match="max_queued"):
        UploadReceiver(lambda: 0, max_queued=0)


def test_a_slow_evaluation_leaves_nothing_unacknowledged_at_the_embedded_broker(tiny_export, tmp_path, caplog):
    """amqtt waits 5 s for a PUBACK, then logs an error and gives the message up. The server used to
    hold the round's last update unacknowledged through finish() and the evaluation: one traceback
    per round in every `fftmoe run` log."""
    def slow_evaluation(global_arrays):
        time.sleep(6)
        return {}

    with EmbeddedBroker(port=0) as embedded:
        devices = start_fake_fleet(embedded.url, "slow", ["small", "big"])
        server, runner = serve_in_thread(tiny_export, embedded.url, tmp_path / "state", slow_evaluation,
                                         federation="slow", rounds=2, min_devices=2, min_updates=2)
        runner.join(timeout=90)
        for device in devices:
            device.stop()
        assert not runner.is_alive() and server.state.round == 2
    assert not [r.getMessage() for r in caplog.records if "PUBACK" in r.getMessage()]
