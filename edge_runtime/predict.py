"""`fftmoe predict`: classify texts with a model folder written by `fftmoe run` (plain onnxruntime).

The folder holds `model.onnx` (ids, mask -> logits), `tokenizer.json` and `labels.json`. Prints one
line per text: the label, its probability, and the text's start (or JSON Lines with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model.onnx of a run (or its folder)")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--input", help="a text file, one text per line")
    parser.add_argument("--json", action="store_true", help="one JSON object per text with every probability")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = Path(args.model)
    folder = model if model.is_dir() else model.parent
    model = folder / "model.onnx" if model.is_dir() else model
    texts = list(args.texts)
    if not model.is_file():
        print(f"fftmoe predict: error: {model} not found (a run writes it under RUN/model/)", file=sys.stderr)
        return 2
    try:
        if args.input:
            texts += [line.strip() for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
        meta = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"fftmoe predict: error: cannot read {folder / 'labels.json'} or the input file: {err}", file=sys.stderr)
        return 2
    if not texts:
        print("fftmoe predict: error: give texts as arguments or --input FILE", file=sys.stderr)
        return 2
    from edge_runtime import _ort
    from edge_runtime.local_data import TextEncoder

    session = _ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ids, mask = TextEncoder(folder / "tokenizer.json", int(meta["seq_len"])).encode(texts)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]  # [N, C]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)  # [N, C]
    labels = meta["labels"]
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        if args.json:
            print(json.dumps({"text": text, "label": labels[best], "probabilities": dict(zip(labels, p.round(4).tolist()))}))
        else:
            print(f"{labels[best]}\t{p[best]:.3f}\t{text[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
