"""The device side in an environment that has only the `edge` extra: no torch, yet it trains.

.ci/run installs `fftmoe[edge]` into a fresh virtual environment, exports the tiny test model with
the main environment, and runs this file there with FFTMOE_EDGE_ARTIFACTS pointing at the export.
In the main (full) environment these tests are skipped: torch is installed there on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ARTIFACTS = os.environ.get("FFTMOE_EDGE_ARTIFACTS")
pytestmark = pytest.mark.skipif(ARTIFACTS is None, reason="runs in the edge-only environment made by .ci/run")


def test_heavy_packages_are_not_installed():
    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("transformers") is None


def test_device_trains_a_tier_without_torch():
    done = subprocess.run([sys.executable, "-m", "fftmoe.cli", "device", "probe", "--artifacts", ARTIFACTS,
                           "--tier", "small", "--steps", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False and result["step_ms"] > 0


def test_device_imports_no_heavy_module():
    code = ("import sys\nfrom edge_runtime import _ort, manifest, step_probe, cli, agent, label_privacy\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_local_training_round_without_torch(tmp_path):
    """A whole local round as a device runs it: verified artifacts, CSV data, tokenizer, AdamW steps."""
    code = f"""
import importlib.util, sys
from pathlib import Path
import numpy as np
from edge_runtime.local_data import LocalDataset, TextEncoder
from edge_runtime.trainer import LossInputs, TierTrainer, take_steps
from tests.tiny_model import write_tiny_dataset
trainer = TierTrainer({ARTIFACTS!r}, "small", threads=1)
data = write_tiny_dataset(Path({str(tmp_path)!r}) / "local.csv", rows=40)
dataset = LocalDataset(data, labels=trainer.manifest.labels,
                       encoder=TextEncoder(trainer.folder / "tokenizer.json", trainer.tier.seq_len),
                       holdout_fraction=0.2)
tier = trainer.tier
target = np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held)
rng = np.random.default_rng(0)
result = trainer.train_round(trainer.get_params(), take_steps(lambda: dataset.batches(4, rng), 6),
                             LossInputs(0.01, 0.01, target), learning_rate=1e-3)
assert result.steps == 6 and np.isfinite(result.loss)
print("TORCH", importlib.util.find_spec("torch") is not None, "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TORCH False False" in done.stdout
