"""`fftmoe bench aggregate`: streaming FFT-MoE merge throughput vs a memory copy, and peak RSS per N.

For each client count N a fresh subprocess (`--one N`) folds N simulated updates into one
`FftMoeStrategy` round and finishes it, and repeats whole rounds until at least 100 MB were folded
(10 clients: 11 rounds; a single 9 MB round lasts a few milliseconds, too short to time). Updates cycle through the tiers and are generated on the fly
into per-tier buffers that are reused, so the generator's memory does not grow with N. Each update's
arrays are also copied with `np.copyto` into same-size buffers, alternately before and after its fold,
so the copy and the merge see the same bytes in the same cache state. Reported: merge GB/s (update
bytes folded / fold time), memcpy GB/s (the same bytes / copy time), their ratio, `validate_update`
GB/s, `finish` time (normalisation and optimiser, not in the merge rate) and the process's peak RSS
(VmHWM from /proc/self/status; ru_maxrss would carry the parent's peak across fork+exec).
Diagnostic "floor": a second pass over the same N updates, alternating with its own copies in the
same way, times the least numpy work any weighted fold can do: per array one `multiply(x, w,
out=scratch)` and one `add(acc, scratch, out=acc)` into a float32 accumulator block of the same
shape, with no slot routing, checks or denominators: the best a numpy-only fold could do (numpy has
no fused multiply-add, so weighting and accumulating are two streams over memory where a copy makes
one). The merge uses BLAS saxpy, one pass, and beats it; see broker_server/accumulate.py.
Shapes are the default export's (d=384, r=16, M=8, 6 layers, 5 classes; tiers nano 2 slots/2 layers,
small 4/2, medium 4/4, large 8/6) or an export's manifest (`--artifacts DIR`). This is a benchmark
that prints ratios, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from broker_server.aggregation import AggregationConfig, ClientUpdate, FftMoeStrategy, ParamSpace
from broker_server.update_checks import validate_update
from edge_runtime.manifest import ParamEntry

DEFAULT_CLIENTS = (10, 100, 1000)
BUILTIN = {"hidden": 384, "rank": 16, "experts": 8, "layers": 6, "classes": 5}
BUILTIN_TIERS = (("nano", 2, 2), ("small", 4, 2), ("medium", 4, 4), ("large", 8, 6))  # name, slots, layers
MERGE_TARGET = 0.5  # merge at least half the memcpy rate
MIN_TIMED_BYTES = 100e6  # fold at least this much per client count (whole rounds): see run_one


def builtin_space(hidden: int, rank: int, experts: int, layers: int, classes: int) -> ParamSpace:
    """The global space `fftmoe export` writes for a model of these sizes (names as in the manifest)."""
    entries = []
    for layer in range(layers):
        prefix = f"backbone.encoder.layer.{layer}.output.fftmoe_moe."
        shapes = {"w1": (experts, hidden, rank), "b1": (experts, rank), "w2": (experts, rank, hidden),
                  "b2": (experts, hidden), "router": (experts, hidden)}
        entries += [ParamEntry(prefix + n, s, "float32", 0, layer) for n, s in shapes.items()]
    entries += [ParamEntry("fftmoe_head.weight", (classes, hidden), "float32", None, None),
                ParamEntry("fftmoe_head.bias", (classes,), "float32", None, None)]
    return ParamSpace(entries)


def load_shapes(artifacts: Path | None) -> tuple[ParamSpace, list[tuple[str, int, tuple[int, ...]]]]:
    """(space, tiers as (name, slots, adapted layers)) from a manifest, or the built-in default."""
    if artifacts is None:
        space = builtin_space(**BUILTIN)
        top = BUILTIN["layers"]
        return space, [(name, slots, tuple(range(top - n, top))) for name, slots, n in BUILTIN_TIERS]
    from edge_runtime.manifest import load_manifest

    manifest = load_manifest(artifacts)
    tiers = [(t.name, t.experts_held, tuple(t.adapted_layers)) for t in manifest.training_tiers.values()]
    return ParamSpace(manifest.global_params), tiers


class UpdateStream:
    """Simulated updates, one at a time, written into one reused buffer set per tier."""

    def __init__(self, space: ParamSpace, tiers, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.space, self.tiers = space, tiers
        self.buffers = [{name: rng.standard_normal(shape).astype(np.float32)
                         for name, shape in space.tier_shapes(layers, slots).items()} for _, slots, layers in tiers]
        self.tokens = [{layer: np.zeros(slots) for layer in layers} for _, slots, layers in tiers]

    def update(self, i: int) -> ClientUpdate:
        k = i % len(self.tiers)
        _, slots, layers = self.tiers[k]
        m = self.space.experts
        # rotating starts give contiguous and wrapped (non-contiguous) slot maps alike
        slot_map = {layer: [(3 * i + layer + j) % m for j in range(slots)] for layer in layers}
        for layer, tokens in self.tokens[k].items():
            tokens[:] = (np.arange(slots) * 37 + i) % 97 + 1  # [M_t] routed tokens, > 0
        first = next(iter(self.buffers[k].values()))
        first.flat[i % first.size] += 1e-3  # touch the buffer so no two updates are identical
        return ClientUpdate(device_id=f"sim-{i}", params=self.buffers[k], slot_map=slot_map,
                            num_samples=16 + i % 48, expert_tokens=self.tokens[k])


def peak_rss_mb() -> float:
    """Peak resident set of this process in MB (VmHWM on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux/BSD, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


class TwoPassFloor:
    """The floor fold: per array `multiply(x, w, out=scratch)`, `add(acc, scratch, out=acc)`, acc float32."""

    def __init__(self, space: ParamSpace):
        self.acc = {p.name: np.zeros(p.shape, np.float32) for p in space.entries}
        self.scratch = np.empty(max(math.prod(p.shape) for p in space.entries), np.float32)
        self.w = np.zeros((), np.float32)

    def fold(self, update: ClientUpdate) -> None:
        self.w[...] = update.num_samples
        for name, x in update.params.items():
            acc = self.acc[name][:len(x)] if x.ndim else self.acc[name]
            tmp = self.scratch[:x.size].reshape(x.shape)
            np.multiply(x, self.w, tmp)
            np.add(acc, tmp, acc)


def _alternate(stream: UpdateStream, copies, clients: int, fold, check) -> tuple[float, float, float, int]:
    """(fold, copy, check seconds; bytes) over `clients` updates: copy and fold alternating in order,
    then `check(i, update)` (validation, as the server does for every update)."""
    fold_s = copy_s = check_s = 0.0
    nbytes = 0
    for i in range(clients):
        update = stream.update(i)
        pairs = [(copies[i % len(copies)][n], a) for n, a in update.params.items()]
        for phase in ((0, 1) if i % 2 == 0 else (1, 0)):  # alternate so neither always finds a warm cache
            t0 = time.perf_counter()
            if phase == 0:
                for dst, src in pairs:
                    np.copyto(dst, src)
                copy_s += time.perf_counter() - t0
            else:
                fold(update)
                fold_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        check(i, update)
        check_s += time.perf_counter() - t0
        nbytes += sum(a.nbytes for a in update.params.values())
    return fold_s, copy_s, check_s, nbytes


def run_one(clients: int, artifacts: Path | None, weighting: str, seed: int, exact: bool = False) -> dict:
    """Fold `clients` simulated updates in this process and measure; one record."""
    space, tiers = load_shapes(artifacts)
    stream = UpdateStream(space, tiers, seed)
    copies = [{n: np.empty_like(a) for n, a in bufs.items()} for bufs in stream.buffers]
    expected = [space.tier_shapes(layers, slots) for _, slots, layers in tiers]
    rng = np.random.default_rng(seed + 1)
    global_arrays = {p.name: (rng.standard_normal(p.shape) * 0.02).astype(np.float32) for p in space.entries}
    strategy = FftMoeStrategy(space, AggregationConfig(weighting=weighting, exact=exact))
    floor = TwoPassFloor(space)
    strategy.begin_round(global_arrays)
    for i in range(len(tiers)):  # warm-up: first touch of accumulator and copy pages, dispatch caches
        strategy.fold(stream.update(i))
        floor.fold(stream.update(i))
        for name, src in stream.buffers[i].items():
            np.copyto(copies[i][name], src)
    strategy.begin_round(global_arrays)
    base_rss = peak_rss_mb()

    def validate(i: int, update: ClientUpdate) -> None:
        problems = validate_update(update, expected[i % len(tiers)], space.experts)
        if problems:
            raise RuntimeError(f"simulated update {i} is invalid: {problems}")

    # a round of few clients is too short to time once (10 default updates: ~9 MB, a few ms): repeat
    # whole rounds until MIN_TIMED_BYTES were folded, as a server does round after round
    per_update = sum(sum(a.nbytes for a in bufs.values()) for bufs in stream.buffers) / len(stream.buffers)
    rounds = max(1, math.ceil(MIN_TIMED_BYTES / (per_update * clients)))
    fold_s = copy_s = validate_s = finish_s = floor_s = floor_copy_s = 0.0
    nbytes = floor_bytes = 0
    for r in range(rounds):
        if r:
            strategy.begin_round(global_arrays)
        times = _alternate(stream, copies, clients, strategy.fold, validate)
        t0 = time.perf_counter()
        _, stats = strategy.finish()
        finish_s += time.perf_counter() - t0
        assert stats.clients == clients and stats.bytes_folded == times[3]
        # the same updates again through the floor, with the same copies and validation around it
        floor_times = _alternate(stream, copies, clients, floor.fold, validate)
        fold_s, copy_s, validate_s, nbytes = (a + b for a, b in zip((fold_s, copy_s, validate_s, nbytes), times))
        floor_s, floor_copy_s, floor_bytes = floor_s + floor_times[0], floor_copy_s + floor_times[1], \
            floor_bytes + floor_times[3]
    finish_s /= rounds
    merge, memcpy = nbytes / fold_s / 1e9, nbytes / copy_s / 1e9
    floor_ratio = (floor_bytes / floor_s) / (floor_bytes / floor_copy_s)
    return {"clients": clients, "merge_gbps": round(merge, 3), "memcpy_gbps": round(memcpy, 3),
            "ratio": round(merge / memcpy, 4), "floor_gbps": round(floor_bytes / floor_s / 1e9, 3),
            "floor_memcpy_gbps": round(floor_bytes / floor_copy_s / 1e9, 3), "floor_ratio": round(floor_ratio, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rounds": rounds,
            "rss_after_setup_mb": round(base_rss, 1), "mb_folded": round(nbytes / 1e6, 2),
            "fold_s": round(fold_s, 4), "validate_gbps": round(nbytes / validate_s / 1e9, 3),
            "finish_ms": round(1000 * finish_s, 2), "weighting": weighting, "exact": exact}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe bench aggregate", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=list(DEFAULT_CLIENTS),
                        help="client counts, each measured in a fresh process (default 10 100 1000)")
    parser.add_argument("--artifacts", type=Path, help="read shapes and tiers from this export's manifest")
    parser.add_argument("--weighting", choices=("samples", "activation"), default="samples")
    parser.add_argument("--exact", action="store_true",
                        help="fold into the exact integer sums of sharded aggregation (exact_sums.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--one", type=int, metavar="N", help=argparse.SUPPRESS)  # child mode: one record
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(n < 1 for n in args.clients + ([args.one] if args.one is not None else [])):
        print("fftmoe bench aggregate: client counts must be >= 1", file=sys.stderr)
        return 2
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.artifacts, args.weighting, args.seed, args.exact)))
        return 0
    records = []
    for n in args.clients:
        cmd = [sys.executable, "-m", "broker_server.bench_aggregate", "--one", str(n),
               "--weighting", args.weighting, "--seed", str(args.seed)] + (["--exact"] if args.exact else [])
        if args.artifacts is not None:
            cmd += ["--artifacts", str(args.artifacts)]
        print(f"[bench] {n} clients in a fresh process", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"fftmoe bench aggregate: the {n}-client run failed:\n{done.stderr}", file=sys.stderr)
            return 1
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
    spread = max(r["peak_rss_mb"] for r in records) - min(r["peak_rss_mb"] for r in records)
    targets = {"merge_vs_memcpy_target": MERGE_TARGET,
               "merge_target_met": all(r["ratio"] >= MERGE_TARGET for r in records),
               "peak_rss_spread_mb": round(spread, 1)}
    if args.json:
        print(json.dumps({"benchmark": "aggregate", "shapes": str(args.artifacts or "builtin default export"),
                          "records": records, "targets": targets}))
        return 0
    headers = ("clients", "MB folded", "merge GB/s", "memcpy GB/s", "merge/memcpy", "floor GB/s", "floor/memcpy",
               "validate GB/s", "finish ms", "peak RSS MB")
    rows = [(r["clients"], r["mb_folded"], f"{r['merge_gbps']:.2f}", f"{r['memcpy_gbps']:.2f}", f"{r['ratio']:.0%}",
             f"{r['floor_gbps']:.2f}", f"{r['floor_ratio']:.0%}", f"{r['validate_gbps']:.2f}",
             f"{r['finish_ms']:.1f}", f"{r['peak_rss_mb']:.1f}") for r in records]
    cells = [tuple(map(str, headers))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"targets: merge >= {MERGE_TARGET:.0%} of memcpy: "
                 f"{'met' if targets['merge_target_met'] else 'NOT met'} (two-pass numpy floor: "
                 f"{min(r['floor_ratio'] for r in records):.0%}-{max(r['floor_ratio'] for r in records):.0%}); "
                 f"peak RSS spread across client counts: {spread:.1f} MB")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
