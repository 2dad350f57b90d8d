"""The bridged mosquitto deployment of deploy/mosquitto-bridge/ works as shipped: one core broker with the
server (or a coordinator and two aggregator workers), two edge brokers bridged into it, devices on both
edges, real processes on 127.0.0.1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker_server.embedded_broker import free_port
from tests.brokers import mosquitto_binary, wait_for_port
from tests.federation import start_devices, start_server, stop_all, wait_for_rounds

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto-bridge"


def render(template: str, folder: Path, name: str, **values) -> Path:
    """The shipped config with its @PLACEHOLDERS@ filled in, as the README's sed line does."""
    text = (DEPLOY / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    assert not re.search(r"^[^#]*@[A-Z_]+@", text, re.M), f"unfilled placeholder in {template}"
    path = folder / name
    path.write_text(text)
    return path


def start_mosquitto(config: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=open(log, "w"),
                               stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process


@pytest.mark.parametrize("workers", [0, 2], ids=["one-server", "two-workers"])
def test_federation_across_two_bridged_edges(tiny_export, tmp_path, workers):
    core_port, edge_ports = free_port(), [free_port(), free_port()]
    brokers = [start_mosquitto(render("core.conf", tmp_path, "core.conf", CORE_PORT=core_port,
                                      CORE_BIND="127.0.0.1"), core_port, tmp_path / "core.log")]
    for i, port in enumerate(edge_ports):
        config = render("edge.conf", tmp_path, f"edge{i}.conf", EDGE_PORT=port, EDGE_BIND="127.0.0.1",
                        EDGE_NAME=f"edge{i}", CORE_ADDRESS=f"127.0.0.1:{core_port}", FEDERATION="e2e")
        brokers.append(start_mosquitto(config, port, tmp_path / f"edge{i}.log"))
    state = tmp_path / "server-state"
    core = f"mqtt://127.0.0.1:{core_port}"
    server = start_server(tiny_export, state, tmp_path / "server.log", broker=core,
                          extra=["--rounds", "2", "--min-devices", "4", "--min-updates", "4", "--workers", str(workers)])
    devices = [subprocess.Popen([sys.executable, "-m", "fftmoe.cli", "serve", "--worker", "--worker-name", f"w{k}",
                                 "--artifacts", str(tiny_export.root), "--broker", core, "--federation", "e2e"],
                                stdout=open(tmp_path / f"worker{k}.log", "w"), stderr=subprocess.STDOUT)
               for k in range(workers)]  # on the core, beside the coordinator: uploads reach them on their lanes
    try:
        for i, port in enumerate(edge_ports):  # two devices behind each edge, none on the core
            devices += start_devices(f"mqtt://127.0.0.1:{port}", tiny_export, tmp_path, ["small", "big"], first=2 * i)
        records = wait_for_rounds(state, 2, timeout=120, server=server)
        assert server.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop_all(devices + [server])
        for broker in brokers:
            broker.kill()
    assert [r["updates"] for r in records] == [4, 4], records
    assert set(records[-1]["devices"]) == {"dev0", "dev1", "dev2", "dev3"}
    assert all(d["status"] == "ok" and d["bytes_up"] > 0 for d in records[-1]["devices"].values())
    if workers:
        assert "over 2 workers" in (tmp_path / "server.log").read_text()
