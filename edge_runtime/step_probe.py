"""Measure a tier's training step as a device would run it: peak RSS and step time, torch-free.

`python -m edge_runtime.step_probe TIER_DIR --batch B --seq T --vocab V --het-shape L,M` loads the
tier's checkpoint, training / eval / optimizer models, runs one warm-up step and `--steps` timed
steps of random tokens, and prints one JSON line: `peak_rss_mb`, `step_ms` (median wall),
`step_cpu_ms` (median process CPU time: the work, whatever else the host is doing), `load_s`,
`threads`. With `--forbid-torch` any import of torch, transformers or onnx fails, which proves the
numbers are those of a torch-free process. The export runs it in a subprocess for its summary and
the manifest; it is not the device trainer.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import statistics
import sys
import time

FORBIDDEN = ("torch", "transformers", "onnx")


class _ForbidImports(importlib.abc.MetaPathFinder):
    """Fails any import of the heavy export-side packages (but not `onnxruntime`)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in FORBIDDEN:
            raise ImportError(f"{fullname} must not be imported on a device (torch-free runtime)")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.step_probe", description=__doc__.split("\n")[0])
    parser.add_argument("tier_dir")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--het-shape", required=True, help="L,M of the het_target input (M = 0: a LoRA graph, no routing inputs)")
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--forbid-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.forbid_torch:
        sys.meta_path.insert(0, _ForbidImports())

    import numpy as np

    from edge_runtime import _ort
    from edge_runtime.emulation import peak_resident_mb

    started = time.perf_counter()
    tier = args.tier_dir
    state = _ort.CheckpointState.load_checkpoint(f"{tier}/checkpoint")
    # Spinning off, so the process CPU time per step measures the work (emulation scales it).
    module = _ort.Module(f"{tier}/training_model.onnx", state, f"{tier}/eval_model.onnx",
                         session_options=_ort.session_options(args.threads, spinning=False))
    optimizer = _ort.Optimizer(f"{tier}/optimizer_model.onnx", module)
    load_s = time.perf_counter() - started

    rng = np.random.default_rng(0)
    layers, experts = (int(x) for x in args.het_shape.split(","))
    inputs = [rng.integers(0, args.vocab, (args.batch, args.seq), dtype=np.int64),
              np.ones((args.batch, args.seq), dtype=np.int64),
              rng.integers(0, args.labels, (args.batch,), dtype=np.int64),
              np.array(0.01, dtype=np.float32), np.array(0.01, dtype=np.float32),
              np.full((layers, max(experts, 1)), 1.0 / max(experts, 1), dtype=np.float32)]
    if experts == 0:  # a LoRA baseline's graph: ids, mask and labels only
        inputs = inputs[:3]
    module.train()
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        module(*inputs)
        optimizer.step()
        module.lazy_reset_grad()
        if step:  # the first step includes lazy allocation; not a steady-state number
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    print(json.dumps({"peak_rss_mb": round(peak_resident_mb(), 1), "step_ms": round(1000 * statistics.median(times), 2),
                      "step_cpu_ms": round(1000 * statistics.median(cpu_times), 2),
                      "load_s": round(load_s, 3), "threads": args.threads,
                      "torch_imported": any(m.split(".")[0] == "torch" for m in sys.modules)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
