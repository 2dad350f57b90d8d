"""The aggregator's MQTT receive path, run on the network thread by the server and its workers.

`UploadReceiver` reassembles chunks (bounded `wire.Reassembler`), binds each complete message to the
topic it came on (`wire.check_origin`: the topic names the sender), counts the upload bytes of the
current round per device (the size limit and the round's byte totals), and queues `(message, ack)`
for the main thread. It decides nothing else: validation, folding and round logic stay on the main
thread.

Backpressure: the connection runs with manual acknowledgements (`MqttConnection(manual_ack=True)`).
A queued message is acknowledged by the main thread once it has dealt with it; everything else
(a chunk that does not complete a message, a rejected payload) at once. The broker therefore sends
at most its in-flight window beyond what the main thread has finished, and queues the rest itself.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from edge_runtime import wire

log = logging.getLogger("fftmoe.receiver")


class UploadReceiver:
    """`receiver(topic, payload, ack)` as the MQTT callback; `inbox` yields `(message, ack)`."""

    def __init__(self, current_round: Callable[[], int | None]):
        self.inbox: queue.Queue = queue.Queue()
        self._current_round = current_round
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
                self.inbox.put((message, ack))
                queued = True
        except wire.WireError as err:
            self.rejected += 1
            log.warning("rejected a message on %s: %s", topic, err)
        finally:
            if not queued:
                ack()

    def take_bytes(self, device_id: str, round_: int) -> int:
        """The bytes a device uploaded for `round_` so far; the counter restarts."""
        with self._lock:
            return self._bytes.pop((device_id, round_), 0)

    def keep_round(self, round_: int) -> None:
        """Forget the counters of other rounds (devices that never answered them): bounded, not leaked."""
        with self._lock:
            self._bytes = {k: v for k, v in self._bytes.items() if k[1] == round_}

    @property
    def counters(self) -> int:
        return len(self._bytes)
