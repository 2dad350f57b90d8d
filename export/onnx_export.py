"""PyTorch -> ONNX for the adapted model: the forward training graph and nothing else.

Uses the TorchScript exporter with the settings that keep every parameter a separately named
initializer (see ORT_NOTES.md): training mode and no constant folding, since eval-mode export
de-duplicates equal initializers (two zero biases become one) and ORT could then not train them
separately. Batch and sequence axes are dynamic. It is not the artifact generator (`artifacts.py`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from export.model import AdaptedClassifier, LoraClassifier

OPSET = 17  # ORT 1.19.2 loads ai.onnx <= 21; 17 is the TorchScript exporter's well-trodden opset


def example_inputs(model: AdaptedClassifier | LoraClassifier, batch: int, seq_len: int, vocab: int) -> tuple:
    """Inputs with the training graph's names, shapes and dtypes, for tracing and tests."""
    return model.example_inputs(batch, seq_len, vocab)


def export_training_onnx(model: AdaptedClassifier | LoraClassifier, path: Path, batch: int, seq_len: int) -> onnx.ModelProto:
    """Trace `model` to an ONNX forward graph at `path` and return it (weights embedded)."""
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
               "labels": {0: "batch"}, "logits": {0: "batch"}}
    vocab = int(model.backbone.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in transformers
        torch.onnx.export(
            model, example_inputs(model, batch, seq_len, vocab), str(path),
            input_names=list(model.train_inputs), output_names=list(model.train_outputs),
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
        )
    return onnx.load(str(path))
