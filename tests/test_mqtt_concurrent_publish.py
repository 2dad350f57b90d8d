"""Publishing from several threads at once never corrupts the MQTT byte stream.

paho 2.x writes a publish straight to the socket from the calling thread unless it runs its own
loop thread (`loop_start`), which `MqttConnection` does not: it drives `loop()` from its own thread
for jittered reconnects. Two threads writing at once interleave partial writes of large packets:
the broker delivers a chunk holding another packet's bytes (the receiver's sha256 catches it) and
drops the connection. Seen as a ChecksumError and a "connection reset" in `fftmoe bench fleet
--workers 2` on a loaded host.
"""

from __future__ import annotations

import threading

import numpy as np

from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig, MqttConnection
from tests.brokers import Mosquitto

THREADS, MESSAGES_PER_THREAD = 4, 5


def _update(k: int, i: int) -> wire.Update:
    rng = np.random.default_rng(k * 1000 + i)
    params = {"w": rng.standard_normal((256, 1024)).astype(np.float32)}  # 1 MiB: four 256 KiB chunks
    return wire.Update(device_id=f"t{k}", round=i, tier="nano", params=params, expert_tokens={}, num_samples=1)


def test_concurrent_multi_chunk_publishes_arrive_intact(tmp_path):
    broker = Mosquitto(tmp_path).start()
    total = THREADS * MESSAGES_PER_THREAD
    received, errors, done, writers = [], [], threading.Event(), set()
    reassembler = wire.Reassembler(max_pending_messages=256, max_pending_per_source=64)

    def on_message(topic: str, payload: bytes) -> None:
        try:
            message = reassembler.add(payload, source=topic)
            if message is not None:
                received.append(message)
        except wire.WireError as err:  # what the test counts
            errors.append(repr(err))
        if len(received) + len(errors) >= total:
            done.set()

    config = BrokerConfig(port=broker.port)
    subscriber = MqttConnection(config, "stress-sub", [("stress/#", 1)], on_message)
    publisher = MqttConnection(config, "stress-pub", [], lambda *_: None)

    def publish(k: int) -> None:
        for i in range(MESSAGES_PER_THREAD):
            assert publisher.publish_chunks(f"stress/{k}", wire.encode(_update(k, i)), qos=1, timeout=60)

    try:
        subscriber.start()
        publisher.start()
        assert subscriber.wait_connected(10) and publisher.wait_connected(10)
        send = publisher._client._sock_send

        def recording_send(data):  # paho's one way to the socket
            writers.add(threading.current_thread().name)
            return send(data)

        publisher._client._sock_send = recording_send
        threads = [threading.Thread(target=publish, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.wait(60)
    finally:
        publisher.stop()
        subscriber.stop()
        broker.kill()
    assert writers == {"mqtt-network"}  # never a publishing thread, which would interleave its writes
    assert errors == [] and publisher.connects == 1  # no corrupt chunk, no dropped connection
    assert sorted((m.device_id, m.round) for m in received) == [(f"t{k}", i) for k in range(THREADS)
                                                                for i in range(MESSAGES_PER_THREAD)]
    for m in received:
        np.testing.assert_array_equal(m.params["w"], _update(int(m.device_id[1:]), m.round).params["w"])
