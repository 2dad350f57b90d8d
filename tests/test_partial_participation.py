"""Partial participation: the server samples a fraction of the registered devices each round, and the
devices it did not sample stay idle (they publish nothing; no polling) until they are sampled."""

from __future__ import annotations

import collections
import os
import threading
import time

from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig, MqttConnection
from tests.brokers import Mosquitto
from tests.federation import start_devices, start_server, stop_all, wait_for_rounds


def test_unsampled_devices_stay_idle(tiny_export, tmp_path):
    broker = Mosquitto(tmp_path).start()
    published: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # device -> kind
    lock = threading.Lock()

    rounds_started = threading.Event()  # set at the first task: every device has joined by then
    roll_call = [0.0]  # when the server last asked everyone to announce themselves (on its connect)

    def spy(topic: str, payload: bytes) -> None:
        parsed = wire.parse_topic(topic)
        if parsed.kind == "task":
            rounds_started.set()
            return
        if parsed.kind == "global":
            if wire.decode_single(payload).note == wire.ROLL_CALL:
                roll_call[0] = time.monotonic()
            return
        with lock:
            if parsed.kind == "up":
                published[parsed.device_id][f"up/{parsed.round}"] += 1
            elif rounds_started.is_set() and time.monotonic() - roll_call[0] > 5.0:
                # an answer to the roll call may land after the first task (a device that had announced
                # itself already makes the quorum); anything else while waiting would be polling
                published[parsed.device_id]["presence during rounds"] += 1

    subscriptions = [(wire.presence_subscription("e2e"), 1), (wire.upload_subscription("e2e"), 1),
                     (f"{wire.TOPIC_ROOT}/e2e/task/+", 1), (wire.global_topic("e2e"), 1)]
    listener = MqttConnection(BrokerConfig.from_url(broker.url), f"spy-{os.getpid()}", subscriptions, spy)
    listener.start()
    assert listener.wait_connected(10)
    state = tmp_path / "server-state"
    server = start_server(tiny_export, state, tmp_path / "server.log", broker=broker.url,
                          extra=["--rounds", "3", "--min-devices", "4", "--fraction", "0.5", "--min-updates", "2"])
    devices = start_devices(broker.url, tiny_export, tmp_path, ["small", "big", "small", "big"])
    try:
        records = wait_for_rounds(state, 3, timeout=120, server=server)
        assert server.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()[-3000:]
        with lock:
            seen = {device: dict(kinds) for device, kinds in published.items()}
    finally:
        stop_all(devices + [server])
        listener.stop()
        broker.kill()
    assert all(r["participants"] == 2 for r in records)  # ceil(0.5 x 4) sampled per round
    sampled = {r["round"]: set(r["devices"]) for r in records}
    for device in ("dev0", "dev1", "dev2", "dev3"):
        kinds = seen.get(device, {})
        rounds_uploaded = {int(k.split("/")[1]) for k in kinds if k.startswith("up/")}
        assert rounds_uploaded == {r for r, who in sampled.items() if device in who}, (device, kinds, sampled)
        # after joining (a retained online Presence and a Hello) nothing while it waits: no heartbeats, no polls
        assert "presence during rounds" not in kinds, (device, kinds)
