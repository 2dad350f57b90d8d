"""Helpers to run a real federation in tests: a `fftmoe serve` process and `fftmoe device` processes, or
an aggregation server in this process (to give it an evaluation, or to watch its logs)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.tiny_model import write_tiny_dataset


def start_server(manifest, state: Path, log: Path, *, port: int | None = None, broker: str | None = None,
                 extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fftmoe.cli", "serve", "--artifacts", str(manifest.root), "--state-dir", str(state),
           "--federation", "e2e", "--round-deadline-s", "60", "--local-steps", "3", *(extra or [])]
    cmd += ["--broker", broker] if broker else ["--port", str(port)]
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def start_devices(url: str, manifest, folder: Path, tiers: list[str], extra: list[str] | None = None,
                  first: int = 0) -> list[subprocess.Popen]:
    processes = []
    for i, tier in enumerate(tiers, start=first):
        data = write_tiny_dataset(folder / f"data-{i}.csv", rows=40, seed=i)
        cmd = [sys.executable, "-m", "fftmoe.cli", "device", "run", "--device-id", f"dev{i}", "--artifacts",
               str(manifest.root), "--tier", tier, "--data", str(data), "--broker", url, "--federation", "e2e",
               "--state-dir", str(folder / f"state-{i}"), "--threads", "1", *(extra or [])]
        processes.append(subprocess.Popen(cmd, stdout=open(folder / f"device-{i}.log", "a"), stderr=subprocess.STDOUT))
    return processes


def serve_in_thread(manifest, url: str, state: Path, evaluate=None, **config):
    """An `AggregationServer` on `url`, running in a daemon thread: (server, thread)."""
    from broker_server.config import ServerConfig
    from broker_server.server import AggregationServer
    from broker_server.state import StateStore
    from edge_runtime.mqtt import BrokerConfig

    server = AggregationServer(ServerConfig(artifacts=str(manifest.root), state_dir=str(state), **config), manifest,
                               StateStore(state), BrokerConfig.from_url(url), evaluate=evaluate)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def metrics(state: Path) -> list[dict]:
    path = state / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_rounds(state: Path, rounds: int, timeout: float, server: subprocess.Popen | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = metrics(state)
        if len(records) >= rounds:
            return records
        if server is not None and server.poll() is not None and len(records) < rounds:
            raise RuntimeError(f"server exited with {server.returncode} after {len(records)} rounds")
        time.sleep(0.2)
    raise TimeoutError(f"only {len(metrics(state))} of {rounds} rounds after {timeout} s")


def stop_all(processes) -> list[int]:
    codes = []
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            codes.append(p.wait(timeout=30))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes
