"""A minimal aggregator stand-in for device-agent tests: real MQTT client, real wire messages.

It only does what a test needs (collect hellos and uploads, send tasks, re-send a task when a
device re-announces); the real aggregator is `broker_server`.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edge_runtime import wire
from edge_runtime.mqtt import BrokerConfig, MqttConnection


class Harness:
    def __init__(self, url: str, federation: str = "t"):
        self.federation = federation
        self.inbox: queue.Queue = queue.Queue()
        self.reassembler = wire.Reassembler()
        self.chunks_seen = 0
        self.on_upload_chunk = None  # test hook: called with the chunk count so far
        self.resend_on_hello: dict[str, wire.RoundTask] = {}  # open tasks, re-sent (fresh ids) until answered
        self.connection = MqttConnection(
            BrokerConfig.from_url(url, reconnect_min_s=0.1, reconnect_max_s=0.5), f"harness-{os.getpid()}",
            [(wire.presence_subscription(federation), 1), (wire.upload_subscription(federation), 1)], self._receive,
            on_connect=self._resend_open_tasks)
        self.connection.start()
        assert self.connection.wait_connected(10), "harness could not connect"
        self._stopped = threading.Event()
        threading.Thread(target=self._resend_periodically, daemon=True).start()

    def _resend_periodically(self, interval: float = 2.0) -> None:
        """Like the real aggregator: open tasks are re-sent until their update arrives, so a message
        lost while either side was reconnecting is recovered (devices answer a repeat with the
        update they already trained)."""
        while not self._stopped.wait(interval):
            if self.connection.connected:
                self._resend_open_tasks()

    def _resend_open_tasks(self) -> None:
        """After a reconnect, re-send open tasks: a device may have uploaded while we were away."""
        for device_id, task in list(self.resend_on_hello.items()):
            self.connection.publish_chunks(wire.task_topic(self.federation, device_id), wire.encode(task))

    def _receive(self, topic: str, payload: bytes) -> None:
        if wire.parse_topic(topic).kind == "up":
            self.chunks_seen += 1
            if self.on_upload_chunk is not None:
                self.on_upload_chunk(self.chunks_seen)
        message = self.reassembler.add(payload, source=topic)
        if message is None:
            return
        wire.check_origin(message, topic)
        if isinstance(message, (wire.Update, wire.ErrorReply)):
            self.resend_on_hello.pop(message.device_id, None)  # the task is answered
        if isinstance(message, wire.Hello) and message.device_id in self.resend_on_hello:
            threading.Thread(target=self.connection.publish_chunks, daemon=True,  # not on the network thread
                             args=(wire.task_topic(self.federation, message.device_id),
                                   wire.encode(self.resend_on_hello[message.device_id]))).start()
        self.inbox.put(message)

    def wait_for(self, kind, device_id: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(message, kind) and message.device_id == device_id:
                return message
        raise TimeoutError(f"no {kind.__name__} from {device_id} within {timeout} s")

    def send(self, device_id: str, chunks: list[bytes]) -> None:
        assert self.connection.publish_chunks(wire.task_topic(self.federation, device_id), chunks)

    def stop(self) -> None:
        self._stopped.set()
        self.connection.stop()


def task_for(manifest, tier_name: str, device_id: str, round_: int, federation: str = "t", steps: int = 4,
             upload_dtype: str = "float32") -> wire.RoundTask:
    """A round task with the global initial arrays of slots 0..M_t-1."""
    tier = manifest.tier(tier_name)
    with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as data:
        glob = {k: data[k] for k in data.files}
    slots = list(range(tier.experts_held))
    params = {p.name: (glob[p.name] if p.slot_axis is None else glob[p.name][slots]) for p in tier.params}
    return wire.RoundTask(federation=federation, round=round_, device_id=device_id, tier=tier_name,
                          slot_map={str(layer): slots for layer in tier.adapted_layers}, lambda_bal=0.01,
                          lambda_het=0.01, het_target={}, local_steps=steps, learning_rate=1e-3, deadline_s=60.0,
                          upload_dtype=upload_dtype, params=params)


def start_device(url: str, manifest, tier: str, device_id: str, data: Path, state: Path, log: Path,
                 federation: str = "t", extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fftmoe.cli", "device", "run", "--device-id", device_id, "--artifacts",
           str(manifest.root), "--tier", tier, "--data", str(data), "--broker", url, "--federation", federation,
           "--state-dir", str(state), "--threads", "1", *(extra or [])]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
