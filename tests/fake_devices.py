"""Devices that answer every task at once with a seeded update: no ONNX Runtime, real MQTT and wire.

A fake device announces itself with a Hello (again on the server's roll call), and answers each RoundTask with an Update whose arrays
are the task's arrays plus noise seeded by (device, round): the same task gets the same bytes, in
any federation, however often it is repeated (as a real device re-sends its cached update). It
uploads on the lane the task names, like the device agent. Used where the test is about the
aggregator side (sharding, bit-for-bit results), where real training would only add time.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time

import numpy as np

from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig, MqttConnection


class FakeDevice:
    def __init__(self, url: str, federation: str, device_id: str, tier: str, samples: int, delay_s: float = 0.0,
                 ignore_tasks: int = 0):
        """ignore_tasks: leave the first tasks unanswered, as a device that lost them (a crash, a reboot)."""
        self.federation, self.device_id, self.tier, self.samples = federation, device_id, tier, samples
        self.delay_s, self.ignore_tasks = delay_s, ignore_tasks
        self.tasks_seen = 0
        self._lost: tuple[int, float] | None = None  # (round, until when) of the task it lost last
        self._inbox: queue.Queue = queue.Queue()
        self._reassembler = wire.Reassembler()
        self._stop = threading.Event()
        self.connection = MqttConnection(BrokerConfig.from_url(url), client_id=f"fake-{device_id}",
                                         subscriptions=[(wire.task_topic(federation, device_id), wire.QOS_TASK),
                                                        (wire.global_topic(federation), wire.QOS_GLOBAL)],
                                         on_message=self._receive, on_connect=self._hello)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _hello(self) -> None:
        hello = wire.Hello(device_id=self.device_id, profile="fake", tier=self.tier)
        self.connection.publish_chunks(wire.presence_topic(self.federation, self.device_id), wire.encode(hello))

    def _receive(self, topic: str, payload: bytes) -> None:
        message = self._reassembler.add(payload, source=topic)
        if isinstance(message, wire.RoundTask):
            self._inbox.put(message)
        elif isinstance(message, wire.GlobalState) and message.note == wire.ROLL_CALL:
            self._inbox.put("hello")  # a (re)started server asks everyone to announce themselves

    def start(self) -> "FakeDevice":
        self.connection.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.connection.stop()

    def update_for(self, task: wire.RoundTask) -> wire.Update:
        seed = int.from_bytes(hashlib.sha256(f"{self.device_id}/{task.round}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        params = {name: (a + rng.standard_normal(a.shape) * 0.01).astype(np.float32)
                  for name, a in sorted(task.params.items())}
        tokens = {layer: [int(t) for t in rng.integers(1, 500, len(slots))] for layer, slots in task.slot_map.items()}
        return wire.Update(device_id=self.device_id, round=task.round, tier=self.tier, params=params,
                           expert_tokens=tokens, num_samples=self.samples, metrics={"loss": 1.0})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                task = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if task == "hello":
                self._hello()
                continue
            if self._lost is not None and task.round == self._lost[0] and time.monotonic() < self._lost[1]:
                continue  # the server re-sent the task it lost (it re-sends on every Hello): lost as well
            self.tasks_seen += 1
            if self.tasks_seen <= self.ignore_tasks:
                self._lost = (task.round, time.monotonic() + task.deadline_s / 2)  # the next attempt comes later
                continue
            if self._stop.wait(self.delay_s):
                return
            topic = wire.upload_topic(self.federation, self.device_id, task.round, task.upload_lane or None)
            self.connection.publish_chunks(topic, wire.encode(self.update_for(task)), wire.QOS_UPLOAD)


def start_fake_fleet(url: str, federation: str, tiers: list[str], delays: list[float] | None = None) -> list[FakeDevice]:
    return [FakeDevice(url, federation, f"fake{i}", tier, samples=20 + 7 * i,
                       delay_s=(delays or [0.0] * len(tiers))[i]).start() for i, tier in enumerate(tiers)]
