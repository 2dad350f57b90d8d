"""The global model of a run: evaluated on the held-out test split, and exported ready to serve.

The server's global arrays hold every global expert; to run them we load the exported tier that
holds the most (largest experts held x adapted layers), fill its slots with the most-used global
experts of each layer (all of them when the tier holds M), and use its eval graph for test
accuracy or derive a plain-onnxruntime inference model from it. Torch-free.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge_runtime.local_data import LocalDataset, TextEncoder
from edge_runtime.manifest import Manifest
from edge_runtime.trainer import TierTrainer, export_inference_model


def serving_tier(manifest: Manifest) -> str:
    return max(manifest.tiers.values(), key=lambda t: (t.experts_held * len(t.adapted_layers), t.experts_held)).name


class GlobalModel:
    """Loads the serving tier once; `evaluate(global_arrays)` and `export(global_arrays, folder)`."""

    def __init__(self, manifest: Manifest, test_file: Path | None, threads: int = 2):
        self.manifest = manifest
        self.trainer = TierTrainer(manifest.root, serving_tier(manifest), threads=threads, verify=False)
        self.test = None
        if test_file is not None:
            encoder = TextEncoder(self.trainer.folder / "tokenizer.json", self.trainer.tier.seq_len)
            self.test = LocalDataset(test_file, labels=manifest.labels, encoder=encoder, holdout_fraction=0.0)

    def load(self, global_arrays: dict[str, np.ndarray], usage: dict | None = None) -> None:
        tier = self.trainer.tier
        arrays = {}
        for p in tier.params:
            value = global_arrays[p.name]
            if p.slot_axis is not None:
                share = np.asarray((usage or {}).get(str(p.layer), np.zeros(value.shape[0])), dtype=np.float64)
                slots = sorted(np.argsort(-share, kind="stable")[: tier.experts_held].tolist())
                value = value[slots]
            arrays[p.name] = value
        self.trainer.set_params(arrays)

    def evaluate(self, global_arrays: dict[str, np.ndarray], usage: dict | None = None) -> dict[str, float]:
        self.load(global_arrays, usage)
        rng = np.random.default_rng(0)
        loss, accuracy, seen = self.trainer.evaluate(self.test.batches(32, rng))
        return {"test_accuracy": accuracy, "test_loss": loss, "test_samples": seen}

    def export(self, global_arrays: dict[str, np.ndarray], folder: Path, usage: dict | None = None) -> Path:
        """Write `folder/model.onnx`, `tokenizer.json` and `labels.json` (what `fftmoe predict` reads)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.load(global_arrays, usage)
        export_inference_model(self.trainer, folder / "model.onnx")
        shutil.copyfile(self.trainer.folder / "tokenizer.json", folder / "tokenizer.json")
        (folder / "labels.json").write_text(json.dumps({"labels": list(self.manifest.labels),
                                                        "seq_len": self.trainer.tier.seq_len}, indent=1) + "\n")
        return folder / "model.onnx"
