"""`fftmoe bench NAME`: dispatch to a benchmark, importing only the one that runs.

Benchmarks print ratios measured side by side in one run (these machines are shared and noisy);
they are never timed tests.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "train-step": ("export.bench_train_step", "ORT training step vs PyTorch eager per tier, with peak RSS"),
    "aggregate": ("broker_server.bench_aggregate", "streaming aggregation throughput vs memcpy, peak RSS per client count"),
    "accuracy": ("hw_profiles.bench_accuracy", "every method on the same partitions and seeds: resumable accuracy grid"),
    "fleet": ("broker_server.bench_fleet", "simulated devices upload through a real broker: aggregated vs broker-only rate, peak RSS per N"),
    "emulation": ("hw_profiles.bench_emulation", "emulated time of the same work alone vs K devices with and without core slots"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = ["usage: fftmoe bench NAME [options]", "", "benchmarks:"]
        lines += [f"  {name}  {help_}" for name, (_, help_) in BENCHMARKS.items()]
        known = not argv or argv[0] in ("-h", "--help")
        print("\n".join(lines), file=sys.stdout if known else sys.stderr)
        if argv and not known:
            print(f"fftmoe bench: unknown benchmark {argv[0]!r}", file=sys.stderr)
        return 0 if argv and known else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
