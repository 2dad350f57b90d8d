"""The global model of a run: evaluated on the held-out test split, and exported ready to serve.

The server's global arrays hold every global expert (or, for the LoRA baselines, the global factors);
to run them we load the serving tier (the tiers file's serving-only tier, else the device tier that
trains the most parameters), fill it with what the run's method deploys there
(`RoundMethod.serving_arrays`: the most-used experts of each layer, all of them when the tier holds M,
or the tier's rank-r view of the factors), and use its eval graph for test accuracy or derive a
plain-onnxruntime inference model from it. Torch-free.
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
    """The tiers file's serving-only tier when it has one, else the device tier with the most weights."""
    serving = [t.name for t in manifest.tiers.values() if t.serving_only]
    return serving[0] if serving else largest_training_tier(manifest)


def describe_serving(manifest: Manifest) -> str:
    """One line for run summaries: which tier serves, and how much of the global model it holds."""
    tier = manifest.tier(serving_tier(manifest))
    held = f"LoRA rank {tier.rank}" if manifest.is_lora else f"{tier.experts_held} of {manifest.experts} experts per layer"
    layers = len(tier.adapted_layers)
    return f"tier {tier.name}{' (serving only)' if tier.serving_only else ''}: {held}, {layers} layer{'s' * (layers != 1)}"


def largest_training_tier(manifest: Manifest) -> str:
    """The device tier that trains the most parameters (the heaviest step)."""
    return max(manifest.training_tiers.values(), key=lambda t: t.trainable_params).name


class GlobalModel:
    """Loads the serving tier once; `evaluate(global_arrays)` and `export(global_arrays, folder)`.
    `method` is the server's `RoundMethod` (it knows the usage or the rank views)."""

    def __init__(self, manifest: Manifest, test_file: Path | None, method, threads: int = 2):
        self.manifest, self.method = manifest, method
        self.trainer = TierTrainer(manifest.root, serving_tier(manifest), threads=threads, verify=False)
        self.test = None
        if test_file is not None:
            encoder = TextEncoder(self.trainer.folder / "tokenizer.json", self.trainer.tier.seq_len)
            self.test = LocalDataset(test_file, labels=manifest.labels, encoder=encoder, holdout_fraction=0.0)

    def load(self, global_arrays: dict[str, np.ndarray]) -> None:
        self.trainer.set_params(self.method.serving_arrays(global_arrays, self.trainer.tier))

    def evaluate(self, global_arrays: dict[str, np.ndarray]) -> dict[str, float]:
        self.load(global_arrays)
        rng = np.random.default_rng(0)
        loss, accuracy, seen = self.trainer.evaluate(self.test.batches(32, rng))
        return {"test_accuracy": accuracy, "test_loss": loss, "test_samples": seen}

    def export(self, global_arrays: dict[str, np.ndarray], folder: Path) -> Path:
        """Write `folder/model.onnx`, `tokenizer.json` and `labels.json` (what `fftmoe predict` reads)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.load(global_arrays)
        export_inference_model(self.trainer, folder / "model.onnx")
        shutil.copyfile(self.trainer.folder / "tokenizer.json", folder / "tokenizer.json")
        (folder / "labels.json").write_text(json.dumps({"labels": list(self.manifest.labels),
                                                        "seq_len": self.trainer.tier.seq_len}, indent=1) + "\n")
        return folder / "model.onnx"
