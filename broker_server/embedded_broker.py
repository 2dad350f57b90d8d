"""An MQTT broker inside the server process: amqtt on its own event loop thread, loopback by default.

With it, `fftmoe serve` (and `fftmoe run`) is a working federation on one laptop with no system
install. Only amqtt's anonymous-auth plugin is loaded (its default plugin set also loads a packet
logger that logs every packet and a $SYS publisher). It speaks MQTT 3.1.1 only and is slower than
Debian's mosquitto (ORT_NOTES: 5 MB in ~0.12 s vs ~0.04 s); real fleets use an external broker
(`--broker mqtt://...`). This module is the only importer of amqtt.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from contextlib import contextmanager
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start (port taken, amqtt missing)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (tests and `--port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Return once something accepts TCP connections on host:port; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def mosquitto_binary() -> str | None:
    """Debian's mosquitto (the broker the benches and tests compare against), None if not installed."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class EmbeddedBroker:
    """`start()` binds host:port and serves until `stop()`. Port 0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        try:
            import amqtt.broker  # noqa: F401
        except ImportError as err:
            raise EmbeddedBrokerError("the embedded broker needs amqtt: pip install 'fftmoe[server]'") from err
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)  # amqtt logs every connection, and benign PUBACK races
        self._thread = threading.Thread(target=self._serve, daemon=True, name="embedded-broker")
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise EmbeddedBrokerError(f"embedded MQTT broker could not listen on {self.host}:{self.port}: "
                                      f"{self._error or 'timed out'}")
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def _serve(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot():
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as err:  # noqa: BLE001 - reported to start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            future.result(timeout=10)
        except Exception as err:  # noqa: BLE001 - shutting down anyway
            log.debug("embedded broker shutdown: %s", err)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def loopback_broker(kind: str):
    """Yield (url, description) of a broker for a benchmark: "embedded" (amqtt in this process),
    "mosquitto" (Debian's, on a free loopback port, with the fleet config's queue limit) or a URL."""
    if kind == "embedded":
        with EmbeddedBroker(port=0) as embedded:
            yield embedded.url, "embedded amqtt (in the bench's main process)"
        return
    if kind != "mosquitto":
        yield kind, f"external {kind}"
        return
    from broker_server.fleet import MAX_QUEUED_MESSAGES

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as folder:
        config = Path(folder) / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                          f"max_queued_messages {MAX_QUEUED_MESSAGES}\nlog_dest stderr\nlog_type error\n")
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            yield f"mqtt://127.0.0.1:{port}", f"mosquitto on 127.0.0.1:{port}"
        finally:
            proc.kill()
            proc.wait(timeout=10)
