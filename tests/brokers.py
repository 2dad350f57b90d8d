"""Real MQTT brokers on 127.0.0.1 with free ports: Debian's mosquitto and the embedded amqtt broker."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from broker_server.embedded_broker import EmbeddedBroker, free_port, wait_for_port  # noqa: F401 (re-exported)
from broker_server.embedded_broker import mosquitto_binary as find_mosquitto


def mosquitto_binary() -> str:
    found = find_mosquitto()
    if found is None:
        raise RuntimeError("Debian's mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    return found


class Mosquitto:
    """A mosquitto process on a fixed loopback port that can be killed and restarted."""

    def __init__(self, folder: Path, port: int | None = None, extra_config: str = ""):
        self.port = port or free_port()
        self.folder = folder
        self.config = folder / f"mosquitto-{self.port}.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                               f"log_dest stderr\nlog_type error\n{extra_config}")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, pause: float = 0.5) -> None:
        self.kill()
        time.sleep(pause)
        self.start()


@contextmanager
def running_broker(kind: str, folder: Path):
    """Yield the URL of a fresh broker of `kind` ('mosquitto' or 'embedded')."""
    if kind == "mosquitto":
        broker = Mosquitto(folder).start()
        try:
            yield broker.url
        finally:
            broker.kill()
    else:
        with EmbeddedBroker(port=0) as broker:
            yield broker.url
