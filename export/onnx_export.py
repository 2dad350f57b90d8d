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

from export.model import TRAIN_INPUTS, TRAIN_OUTPUTS, AdaptedClassifier

OPSET = 17  # ORT 1.19.2 loads ai.onnx <= 21; 17 is the TorchScript exporter's well-trodden opset


def example_inputs(model: AdaptedClassifier, batch: int, seq_len: int, vocab: int) -> tuple:
    """Inputs with the training graph's names, shapes and dtypes, for tracing and tests."""
    layers = len(model.adapted)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    attention_mask[0, seq_len // 2:] = 0  # one padded row, so masking is traced
    labels = torch.zeros(batch, dtype=torch.int64)
    het_target = torch.full((layers, model.num_experts), 1.0 / model.num_experts)
    return (input_ids, attention_mask, labels, torch.tensor(0.01), torch.tensor(0.01), het_target)


def export_training_onnx(model: AdaptedClassifier, path: Path, batch: int, seq_len: int) -> onnx.ModelProto:
    """Trace `model` to an ONNX forward graph at `path` and return it (weights embedded)."""
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
               "labels": {0: "batch"}, "logits": {0: "batch"}}
    vocab = int(model.backbone.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in transformers
        torch.onnx.export(
            model, example_inputs(model, batch, seq_len, vocab), str(path),
            input_names=list(TRAIN_INPUTS), output_names=list(TRAIN_OUTPUTS),
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
        )
    return onnx.load(str(path))
