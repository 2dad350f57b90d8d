"""The one place that talks to paho-mqtt: a connection that keeps itself connected.

`MqttConnection` owns a paho client (VERSION2 callbacks, MQTT 3.1.1) and its network thread. It
re-subscribes and re-announces on every (re)connect, reconnects with bounded exponential backoff
and full jitter (so a fleet that lost its broker does not reconnect in lockstep), publishes chunk
lists with QoS 1 and waits for the broker's acknowledgements, and hands every received payload to
a callback. It knows nothing about fftmoe messages: payloads are bytes, topics are strings built
by `wire`. Both the device agent and the server use it.

Backpressure (`manual_ack=True`, the aggregator's connections): the callback gets a third argument,
`ack`, and the broker's QoS 1 delivery is acknowledged only when the consumer calls it (from any
thread), once it has dealt with the payload. The broker sends at most its in-flight window of
unacknowledged messages (mosquitto `max_inflight_messages`, 20 by default) and queues the rest on
its side, so a consumer that falls behind holds a bounded backlog instead of an ever longer queue
in memory. The network thread never blocks, so keepalives and the consumer's own publishes go on.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho

log = logging.getLogger(__name__)


class BrokerConfigError(ValueError):
    """A broker URL or TLS setting is unusable."""


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None  # CA that signed the broker's certificate (TLS)
    cert_file: str | None = None  # client certificate (TLS client auth)
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    @classmethod
    def from_url(cls, url: str, **overrides) -> "BrokerConfig":
        """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS, default port 8883)."""
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
            raise BrokerConfigError(f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
        tls = parsed.scheme in ("mqtts", "ssl")
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError as err:
            raise BrokerConfigError(f"broker URL {url!r}: {err}") from err
        fields = dict(host=parsed.hostname, port=port, tls=tls,
                      username=urllib.parse.unquote(parsed.username) if parsed.username else None,
                      password=urllib.parse.unquote(parsed.password) if parsed.password else None)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


Message = tuple[str, bytes]


def _network_thread_writes(client, userdata, sock) -> None:
    """paho's external-event-loop hook, registered so that publishing threads never write (see above)."""


class MqttConnection:
    """A self-healing MQTT client. Call `start()`, then `publish*`; `stop()` to end."""

    def __init__(self, config: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]],
                 on_message: Callable[[str, bytes], None], will: tuple[str, bytes, int, bool] | None = None,
                 on_connect: Callable[[], None] | None = None, rng: random.Random | None = None,
                 manual_ack: bool = False):
        self.config = config
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self._manual_ack = manual_ack
        self._rng = rng or random.Random()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connects = 0  # successful connections so far (tests and logs)
        self._awaiting = 0  # threads inside publish_chunks' wait for acknowledgements
        self._awaiting_lock = threading.Lock()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                             protocol=paho.MQTTv311, reconnect_on_failure=False, manual_ack=manual_ack)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            client.tls_set(ca_certs=config.ca_file, certfile=config.cert_file, keyfile=config.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            topic, payload, qos, retain = will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.max_inflight_messages_set(64)  # enough to stream an update's chunks without stalls
        client.max_queued_messages_set(0)  # unbounded: publish_chunks bounds what it queues
        client.enable_logger(logging.getLogger("paho"))  # DEBUG level: every packet, for --log-level DEBUG
        # Only the network thread may write to the socket. paho 2.x writes a publish straight away from
        # the calling thread unless it runs its own loop thread (loop_start), and we drive loop() from
        # ours for jittered reconnects: two threads publishing at once then interleave partial writes
        # of large packets, the broker delivers chunks holding another packet's bytes and drops the
        # connection (tests/test_mqtt_concurrent_publish.py). With a socket-write callback registered,
        # paho only queues the packet and wakes loop()'s select through its socket pair.
        client.on_socket_register_write = _network_thread_writes
        client.on_socket_unregister_write = _network_thread_writes
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%s refused the connection: %s", self.config.host, self.config.port, reason_code)
            return
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # paho leaves Nagle on. A small packet (a PUBACK, an aggregator worker's receipt) then waits
            # for the ACK of the previous small one, which the broker's kernel delays by up to 40 ms: a
            # worker publishing a receipt per update measured 23 updates/s with Nagle, 739 without
            # (`fftmoe bench fleet --workers 1`).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        self.connects += 1
        self._connected.set()
        log.info("connected to %s:%s", self.config.host, self.config.port)
        if self._on_connect_hook is not None:
            threading.Thread(target=self._on_connect_hook, daemon=True, name="mqtt-on-connect").start()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from %s:%s (%s)", self.config.host, self.config.port, reason_code)

    def _handle_message(self, client, userdata, message) -> None:
        try:
            if self._manual_ack:
                self._on_message(message.topic, bytes(message.payload), self._acker(message))
            else:
                self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a bad payload must never kill the network thread
            log.exception("error handling a message on %s", message.topic)

    def _acker(self, message) -> Callable[[], None]:
        """Acknowledge `message` once (QoS 0 needs none); a no-op after a reconnect, whose clean session
        the broker started without it."""
        if message.qos == 0:
            return lambda: None
        connects, done = self.connects, []

        def ack() -> None:
            if not done and self.connects == connects and self._connected.is_set():
                done.append(True)
                self._client.ack(message.mid, message.qos)
        return ack

    # -- network thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="mqtt-network")
        self._thread.start()

    def _run(self) -> None:
        delay = self.config.reconnect_min_s
        first = True
        while not self._stopping.is_set():
            try:
                if first:
                    self._client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.SSLError, ValueError) as err:
                wait = self._rng.uniform(0, delay)  # full jitter
                log.warning("cannot reach broker %s:%s (%s); retrying in %.1f s", self.config.host,
                            self.config.port, err, wait)
                self._stopping.wait(wait)
                delay = min(delay * 2, self.config.reconnect_max_s)
                continue
            while not self._stopping.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    delay = self.config.reconnect_min_s
            self._connected.clear()
            if not self._stopping.is_set():
                wait = self._rng.uniform(0, delay)
                self._stopping.wait(wait)
                delay = min(delay * 2, self.config.reconnect_max_s)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- publishing (any thread) ---------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30.0) -> bool:
        """Publish one payload; True once the broker acknowledged it (QoS >= 1) or it was sent."""
        return self.publish_chunks(topic, [payload], qos=qos, retain=retain, timeout=timeout)

    def publish_nowait(self, topic: str, chunks: list[bytes], qos: int = 1) -> bool:
        """Queue every chunk for sending and return at once: True if all were queued while connected.
        For small, frequent messages whose loss on a reconnect the protocol repairs (an aggregator
        worker's receipts: the coordinator re-sends the task, the device its cached update, the worker
        its receipt); waiting for each acknowledgement would cost a round trip per message."""
        if not self._connected.is_set():
            return False
        return all(self._client.publish(topic, chunk, qos=qos).rc == paho.MQTT_ERR_SUCCESS for chunk in chunks)

    def publish_chunks(self, topic: str, chunks: list[bytes], qos: int = 1, retain: bool = False,
                       timeout: float = 120.0) -> bool:
        """Publish every chunk and wait for all acknowledgements; False if the connection dropped or
        `timeout` passed first (the caller re-publishes the whole message; receivers drop duplicates)."""
        if threading.current_thread() is self._thread:
            # Waiting here would deadlock: this thread is the one that reads the acknowledgements.
            raise RuntimeError("publish_chunks called from the MQTT network thread (an on_message callback); "
                               "hand the work to another thread")
        if not self._connected.is_set():
            return False
        deadline = time.monotonic() + timeout
        infos = []
        for chunk in chunks:
            info = self._client.publish(topic, chunk, qos=qos, retain=retain)
            if info.rc not in (paho.MQTT_ERR_SUCCESS,):
                return False
            infos.append(info)
        with self._awaiting_lock:
            self._awaiting += 1
        try:
            for info in infos:
                while not info.is_published():
                    if not self._connected.is_set() or time.monotonic() > deadline or self._stopping.is_set():
                        return False
                    info.wait_for_publish(timeout=0.1)
        finally:
            with self._awaiting_lock:
                self._awaiting -= 1
        return True

    @property
    def awaiting_acks(self) -> bool:
        """True while a thread waits in `publish_chunks` for acknowledgements, which only the network
        thread can read: an on_message callback must not block then (broker_server/receiver.py)."""
        return self._awaiting > 0

    def stop(self, final: tuple[str, bytes, int, bool] | None = None) -> None:
        """Optionally publish a last message (e.g. an offline presence), then disconnect."""
        if final is not None and self._connected.is_set():
            topic, payload, qos, retain = final
            self.publish(topic, payload, qos=qos, retain=retain, timeout=2.0)
        self._stopping.set()
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
