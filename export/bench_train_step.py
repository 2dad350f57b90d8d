"""`fftmoe bench train-step`: ORT training step vs the same model in PyTorch eager, per tier.

For each tier: the same batch, the same initial weights (the tier's exported slots), the same
optimiser (AdamW, lr 1e-3, betas 0.9/0.999, eps 1e-6, no weight decay) and the same thread count.
Steps are interleaved (ORT, torch, ORT, torch, ...) so machine noise hits both alike; the medians
are compared. Peak RSS is that of a fresh torch-free process running the tier (the device's number).
This is a benchmark that prints ratios, never a timed test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_ARTIFACTS = Path("artifacts/default")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe bench train-step", description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                        help="export folder; exported from the default model first if it has no manifest")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="backbone the artifacts were exported from")
    parser.add_argument("--tiers", nargs="*", help="tiers to measure (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per engine per tier (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _inputs(manifest, tier, rng):
    ids = rng.integers(1000, manifest.backbone["vocab_size"], (tier.batch_size, tier.seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    labels = rng.integers(0, len(manifest.labels), (tier.batch_size,), dtype=np.int64)
    target = np.full((len(tier.adapted_layers), tier.experts_held), 1.0 / tier.experts_held, np.float32)
    return [ids, mask, labels, np.array(0.01, np.float32), np.array(0.01, np.float32), target]


def measure_tier(manifest, tier_name: str, backbone, threads: int, steps: int, warmup: int) -> dict:
    """Median ORT and PyTorch step times for one tier, interleaved in this process."""
    import torch

    from edge_runtime import _ort
    from export.reference import reference_model

    tier = manifest.tier(tier_name)
    folder = manifest.root / tier.name
    state = _ort.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = _ort.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"),
                         session_options=_ort.session_options(threads))
    optimizer = _ort.Optimizer(str(folder / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(1e-3)
    module.train()

    torch.set_num_threads(threads)
    model = reference_model(manifest, tier.name, backbone)
    model.train()
    torch_opt = torch.optim.AdamW(model.adapter_parameters().values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                                  weight_decay=0.0)
    inputs = _inputs(manifest, tier, np.random.default_rng(0))
    torch_inputs = [torch.from_numpy(x) for x in inputs]

    def ort_step():
        module(*inputs)
        optimizer.step()
        module.lazy_reset_grad()

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        model(*torch_inputs)[0].backward()
        torch_opt.step()

    ort_times, torch_times = [], []
    for i in range(warmup + steps):
        for step, times in ((ort_step, ort_times), (torch_step, torch_times)):
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    ort_ms = 1000 * statistics.median(ort_times)
    torch_ms = 1000 * statistics.median(torch_times)
    return {"tier": tier.name, "ort_ms": round(ort_ms, 1), "torch_ms": round(torch_ms, 1),
            "speedup": round(torch_ms / ort_ms, 3)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_runtime.manifest import MANIFEST_NAME, load_manifest
    from export.artifacts import probe_tier
    from export.backbone import load_backbone
    from fftmoe.tables import format_table
    from export.tiers import Tier

    if not (args.artifacts / MANIFEST_NAME).is_file():
        from export.cli import main as export_main

        print(f"[bench] no export at {args.artifacts}; exporting {args.model} first", file=sys.stderr)
        if export_main(["--model", args.model, "--out", str(args.artifacts)]) != 0:
            return 2
    manifest = load_manifest(args.artifacts)
    backbone = load_backbone(args.model)
    records = []
    for name in args.tiers or list(manifest.tiers):
        print(f"[bench] tier {name}: {args.steps} interleaved steps per engine at {args.threads} threads",
              file=sys.stderr, flush=True)
        record = measure_tier(manifest, name, backbone, args.threads, args.steps, args.warmup)
        t = manifest.tier(name)
        probed = probe_tier(manifest.root / name, Tier(name, t.experts_held, t.top_k, len(t.adapted_layers),
                                                        t.seq_len, t.batch_size),
                            layers=len(t.adapted_layers), experts=t.experts_held, vocab=manifest.backbone["vocab_size"],
                            threads=args.threads, steps=3)
        record["peak_rss_mb"] = probed["peak_rss_mb"]
        records.append(record)
    if args.json:
        print(json.dumps({"benchmark": "train-step", "model": manifest.backbone["id"], "threads": args.threads,
                          "steps": args.steps, "records": records}))
    else:
        rows = [(r["tier"], r["ort_ms"], r["torch_ms"], f"{r['speedup']:.2f}x", r["peak_rss_mb"]) for r in records]
        print(format_table(("tier", "ORT ms", "PyTorch ms", "speedup", "torch-free peak RSS MB"), rows))
    return 0
