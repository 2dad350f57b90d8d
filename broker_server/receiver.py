"""The aggregator's MQTT receive path, run on the network thread by the server and its workers.

`UploadReceiver` reassembles chunks (bounded `wire.Reassembler`), binds each complete message to the
topic it came on (`wire.check_origin`: the topic names the sender), counts the upload bytes of the
current round per device (the size limit and the round's byte totals), and queues `(message, ack)`
for the main thread. It decides nothing else: validation, folding and round logic stay on the main
thread.

Backpressure, in two layers:
- The connection runs with manual acknowledgements (`MqttConnection(manual_ack=True)`). A queued
  update (or worker partial, `HELD`) is acknowledged by the main thread once it has dealt with it;
  everything else (control messages, a chunk that does not complete a message, a rejected payload)
  at once. A broker that keeps its in-flight
  window then sends at most that window beyond what the main thread has finished.
- mosquitto 2.0.11 (Debian's) does not keep it once acknowledgements flow: a consumer acking after
  3 ms each received 379 of 400 messages unacknowledged, under MQTT 3.1.1 and under MQTT 5 with
  Receive Maximum 20 alike (eclipse-mosquitto/mosquitto#2301). So the inbox is bounded here too:
  with `max_queued` messages not yet dealt with, the network thread waits before queueing the next
  one, stops reading the socket, and TCP pushes the backlog back to the broker.
  Two exceptions keep that wait from deadlocking or dropping the connection: while the main thread
  itself waits for the broker's acknowledgement of a publish (`busy()`), which only this network
  thread can read, messages are queued without waiting; and no message waits longer than
  `max_wait_s`, so keep-alive pings still go out while the main thread is away (evaluation).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edge_runtime import wire

log = logging.getLogger("fftmoe.receiver")

# Acknowledged to the broker only once the main thread has dealt with them, while it collects a round
# (`UploadReceiver.holding`): the bulky messages, whose backlog the broker should keep then. Everything
# else, and these between rounds (stragglers, repeats), is acknowledged on arrival: a broker gives up
# waiting (amqtt logs an error after 5 s), and the main thread may be evaluating for longer.
HELD = (wire.Update, wire.WorkerPartial)


def _nothing() -> None:
    pass


class UploadReceiver:
    """`receiver(topic, payload, ack)` as the MQTT callback; `inbox` yields `(message, ack)`."""

    def __init__(self, current_round: Callable[[], int | None], max_queued: int = 32,
                 busy: Callable[[], bool] = lambda: False, max_wait_s: float = 5.0,
                 seen: Callable[[object], None] = lambda message: None):
        """current_round: the round whose upload bytes are counted, read on the network thread;
        max_queued: messages queued but not yet acknowledged before the network thread waits (module
        docstring); busy: True while the main thread waits on the connection (`MqttConnection.awaiting_acks`);
        seen: called on the network thread with each complete message before it is queued (a worker
        learns its round from the plan there, before its main thread gets to it)."""
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        self.inbox: queue.Queue = queue.Queue()
        self.max_queued, self._busy, self._max_wait_s = max_queued, busy, max_wait_s
        self._room = threading.Condition()
        self._unfinished = 0  # queued and not yet acknowledged by the main thread
        self.overflows = 0  # messages queued past max_queued (busy main thread, or max_wait_s passed)
        self.holding = True  # HELD messages wait for the main thread's ack (the server: while it collects)
        self._current_round, self._seen = current_round, seen
        self._reassembler = wire.Reassembler(max_pending_messages=4096, max_pending_per_source=2)
        self._bytes: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # payloads refused (bad topic, frame, hash, message or origin); each is logged

    def __call__(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        queued = False
        try:
            parsed = wire.parse_topic(topic)
            if parsed.kind == "up" and parsed.round is not None and parsed.round == self._current_round():
                key = (parsed.device_id, parsed.round)  # other rounds' bytes are never read: not counted
                with self._lock:
                    self._bytes[key] = self._bytes.get(key, 0) + len(payload)
            message = self._reassembler.add(payload, source=topic)
            if message is not None:
                wire.check_origin(message, topic)
                self._seen(message)
                if not (self.holding and isinstance(message, HELD)):
                    ack()  # the broker need not keep it, nor wait for the main thread (HELD)
                    ack = _nothing
                self._wait_for_room()
                self.inbox.put((message, self._finishing(ack)))
                queued = True
        except wire.WireError as err:
            self.rejected += 1
            log.warning("rejected a message on %s: %s", topic, err)
        finally:
            if not queued:
                ack()

    def _wait_for_room(self) -> None:
        """Block the network thread while `max_queued` messages are unfinished (module docstring)."""
        deadline = None
        with self._room:
            while self._unfinished >= self.max_queued:
                if self._busy():
                    self.overflows += 1
                    break
                now = time.monotonic()
                deadline = deadline or now + self._max_wait_s
                if now >= deadline:
                    self.overflows += 1
                    log.debug("inbox full for %.1f s; queueing past %d", self._max_wait_s, self.max_queued)
                    break
                self._room.wait(timeout=min(0.05, deadline - now))  # re-check busy() often
            self._unfinished += 1

    def _finishing(self, ack: Callable[[], None]) -> Callable[[], None]:
        """`ack` that also frees the message's place in the inbox, once however often it is called."""
        done = []

        def finish() -> None:
            if not done:
                done.append(True)
                ack()
                with self._room:
                    self._unfinished -= 1
                    self._room.notify()
        return finish

    @property
    def unfinished(self) -> int:
        """Messages queued and not yet acknowledged by the main thread."""
        return self._unfinished

    def take_bytes(self, device_id: str, round_: int) -> int:
        """The bytes a device uploaded for `round_` so far; the counter restarts."""
        with self._lock:
            return self._bytes.pop((device_id, round_), 0)

    def keep_round(self, round_: int) -> None:
        """Forget the counters of earlier rounds (devices that never answered them): bounded, not leaked.
        Later rounds' stay: the network thread may already count a round the main thread has not reached."""
        with self._lock:
            self._bytes = {k: v for k, v in self._bytes.items() if k[1] >= round_}

    @property
    def counters(self) -> int:
        return len(self._bytes)
