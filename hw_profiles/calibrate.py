"""Host core micro-benchmark: fp32 GFLOPS of one core on a 256x256 @ 256x256 numpy matmul.

Run as `python -m hw_profiles.calibrate` with the BLAS thread variables set to 1 (they must be set
before numpy is imported, hence a subprocess; `profiles.calibrate_host_core_gflops` does this and
caches the result). Prints one JSON line: `core_gflops` (median over samples), `samples`, `size`.
The profiles' `core_gflops` describe this same benchmark on each device, so host seconds convert to
device seconds by the ratio of the two. Not a general BLAS benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def measure(seconds: float = 0.5, size: int = 256, samples: int = 7) -> list[float]:
    """GFLOPS of `samples` timed batches of matmuls, spread over about `seconds` in total."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    flop = 2.0 * size**3  # one multiply and one add per inner-product term
    for _ in range(3):  # warm-up: page in, let the BLAS pick its kernel
        np.matmul(a, b, out=out)  # [size, size]
    per_sample = max(seconds / samples, 1e-3)
    results = []
    for _ in range(samples):
        count, start = 0, time.perf_counter()
        while True:
            np.matmul(a, b, out=out)  # [size, size]
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_sample:
                break
        results.append(flop * count / elapsed / 1e9)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw_profiles.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="total timed seconds (default 0.5)")
    parser.add_argument("--size", type=int, default=256, help="square matrix size (default 256)")
    args = parser.parse_args(argv)
    samples = measure(args.seconds, args.size)
    print(json.dumps({"core_gflops": round(statistics.median(samples), 2), "samples": [round(s, 2) for s in samples],
                      "size": args.size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
