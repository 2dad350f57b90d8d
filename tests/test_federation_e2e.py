"""A whole federation with real processes on 127.0.0.1: server, broker, three devices of two tiers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from broker_server.embedded_broker import free_port
from tests.brokers import Mosquitto
from tests.federation import start_devices, start_server, stop_all, wait_for_rounds
from tests.tiny_model import LABELS, write_tiny_dataset


def _global(state):
    meta = json.loads((state / "state.json").read_text())
    with np.load(state / meta["global_file"], allow_pickle=False) as data:
        return meta, {k: data[k] for k in data.files}


def _check_three_rounds(tiny_export, state, records):
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["updates"] == 3 and r["participants"] == 3 for r in records)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    assert all(0.0 <= r["device_holdout_accuracy"] <= 1.0 for r in records)
    meta, arrays = _global(state)
    assert meta["round"] == 3
    with np.load(tiny_export.root / tiny_export.global_init.path, allow_pickle=False) as init:
        changed = [k for k in init.files if not np.array_equal(init[k], arrays[k])]
    assert "fftmoe_head.weight" in changed
    assert any(".fftmoe_moe.w2" in k for k in changed)  # W2 starts at zero: experts really trained


@pytest.mark.parametrize("broker_kind", ["embedded", "mosquitto"])
def test_three_devices_three_rounds(tiny_export, tmp_path, broker_kind):
    state = tmp_path / "server-state"
    mosquitto = Mosquitto(tmp_path).start() if broker_kind == "mosquitto" else None
    port = free_port()
    url = mosquitto.url if mosquitto else f"mqtt://127.0.0.1:{port}"
    test_data = write_tiny_dataset(tmp_path / "test.csv", rows=40, seed=99)
    server = start_server(tiny_export, state, tmp_path / "server.log", port=port,
                          broker=mosquitto.url if mosquitto else None,
                          extra=["--rounds", "3", "--min-devices", "3", "--min-updates", "3",
                                 "--test-data", str(test_data), "--model-out", str(tmp_path / "model")])
    devices = start_devices(url, tiny_export, tmp_path, ["small", "big", "small"])
    try:
        records = wait_for_rounds(state, 3, timeout=120, server=server)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-3000:]
        _check_three_rounds(tiny_export, state, records)
    finally:
        codes = stop_all(devices + [server])
        if mosquitto:
            mosquitto.kill()
    assert codes[:3] == [0, 0, 0]  # devices stop cleanly on SIGTERM
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["test_samples"] == 40 for r in records)
    assert "served model after 3 rounds written to" in (tmp_path / "server.log").read_text()
    predicted = subprocess.run([sys.executable, "-m", "fftmoe.cli", "predict", "--model",
                                str(tmp_path / "model" / "model.onnx"), "some text to classify"],
                               capture_output=True, text=True, timeout=60)
    assert predicted.returncode == 0 and predicted.stdout.split("\t")[0] in LABELS, predicted.stderr


def test_test_data_and_model_out_problems_are_named_before_anything_starts(tiny_export, tmp_path):
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "serve", "--artifacts", str(tiny_export.root),
                           "--state-dir", str(state), "--port", "0", "--test-data", str(tmp_path / "missing.csv")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--test-data:" in done.stderr and "missing.csv" in done.stderr, done.stderr
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_export.root, copy)
    checkpoint = copy / "big" / "checkpoint"  # the serving tier's: the only tier --model-out needs
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "serve", "--artifacts", str(copy), "--state-dir",
                           str(state), "--port", "0", "--model-out", str(tmp_path / "model")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "big/checkpoint" in done.stderr, done.stderr
