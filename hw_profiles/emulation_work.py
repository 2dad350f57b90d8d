"""A fixed amount of training work as one emulated device does it, and a runner for K concurrent copies.

`python -m hw_profiles.emulation_work ARTIFACTS TIER STEPS [--no-slots]` loads the tier, prints
`{"ready": true}`, waits for a line on stdin (so concurrent copies start training together), trains
STEPS steps on one ORT thread with spinning off while holding one host core slot (`cpu_slots.py`;
`--no-slots` trains without one, time-slicing the cores like unmanaged processes), and prints one JSON
line: the process CPU seconds the steps took, their wall seconds and the seconds waited for the slot.
`run_copies` starts K copies and collects those lines; `tests/test_emulation.py` and
`fftmoe bench emulation` both use it. Not a device: no broker, data or emulated link.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

THREADS = 1  # one ORT thread, so one core slot, per copy


class WorkError(RuntimeError):
    """A copy failed (its stderr went to this process's stderr)."""


def run_copies(artifacts: str | Path, tier: str, steps: int, copies: int, slots_dir: str | Path,
               slots: bool = True, timeout: float | None = 600.0) -> list[dict]:
    """Run `copies` processes of the work at once (slots in `slots_dir`); one result dict per copy.

    `timeout`: seconds each copy may take once they train (None: no bound)."""
    cmd = [sys.executable, "-m", "hw_profiles.emulation_work", str(artifacts), tier, str(steps)]
    cmd += [] if slots else ["--no-slots"]
    env = {**os.environ, "FFTMOE_CPU_SLOTS_DIR": str(slots_dir)}
    processes = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(copies)]
    try:
        for p in processes:  # every copy loaded before any trains: the copies overlap from the first step
            if json.loads(p.stdout.readline() or "{}").get("ready") is not True:
                raise WorkError(f"a copy of `{' '.join(cmd[1:])}` exited before training (exit code {p.wait()})")
        for p in processes:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    except subprocess.TimeoutExpired:
        raise WorkError(f"the copies of `{' '.join(cmd[1:])}` did not finish in {timeout:.0f} s") from None
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in processes):
        raise WorkError(f"a copy of `{' '.join(cmd[1:])}` failed (exit codes {[p.returncode for p in processes]})")
    return [json.loads(o.strip().splitlines()[-1]) for o in outputs]


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from edge_runtime.cpu_slots import CpuSlots
    from edge_runtime.trainer import LossInputs, TierTrainer

    parser = argparse.ArgumentParser(prog="python -m hw_profiles.emulation_work", description=__doc__.split("\n")[0])
    parser.add_argument("artifacts")
    parser.add_argument("tier")
    parser.add_argument("steps", type=int)
    parser.add_argument("--no-slots", action="store_true", help="train without holding a host core slot")
    args = parser.parse_args(argv)
    trainer = TierTrainer(args.artifacts, args.tier, threads=THREADS, spinning=False)
    tier = trainer.tier
    rng = np.random.default_rng(0)
    ids = rng.integers(5, trainer.manifest.backbone["vocab_size"], (tier.batch_size, tier.seq_len), dtype=np.int64)
    batch = (ids, np.ones_like(ids), np.zeros(tier.batch_size, dtype=np.int64))  # [B, T], [B, T], [B]
    target = np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held)  # [L_t, M_t]
    start = trainer.get_params()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    turn = contextlib.nullcontext(0.0) if args.no_slots else CpuSlots().hold(trainer.threads)
    with turn as waited:
        result = trainer.train_round(start, [batch] * args.steps, LossInputs(0.01, 0.01, target), learning_rate=1e-3,
                                     reset_optimizer=False)  # fresh from loading: no reload inside the turn
    print(json.dumps({"cpu_seconds": result.cpu_seconds, "wall_seconds": result.train_seconds, "waited_s": waited}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C reaches every copy: the runner reports it, once
        sys.exit(130)
