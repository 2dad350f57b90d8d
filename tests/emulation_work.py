"""A fixed amount of training work, run as a process by tests/test_emulation.py.

`python -m tests.emulation_work ARTIFACTS TIER STEPS` trains STEPS steps of the tier as an emulated
device does (ORT spinning off, one host core slot held while training) and prints the process CPU
seconds the steps took, as JSON.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from edge_runtime.cpu_slots import CpuSlots
from edge_runtime.trainer import LossInputs, TierTrainer


def main() -> None:
    artifacts, tier_name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer = TierTrainer(artifacts, tier_name, threads=1, spinning=False)
    tier = trainer.tier
    rng = np.random.default_rng(0)
    ids = rng.integers(5, trainer.manifest.backbone["vocab_size"], (tier.batch_size, tier.seq_len), dtype=np.int64)
    batch = (ids, np.ones_like(ids), np.zeros(tier.batch_size, dtype=np.int64))
    target = np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held)
    start = {n: v for n, v in trainer.get_params().items()}
    with CpuSlots().hold(trainer.threads) as waited:
        result = trainer.train_round(start, [batch] * steps, LossInputs(0.01, 0.01, target), learning_rate=1e-3)
    print(json.dumps({"cpu_seconds": result.cpu_seconds, "wall_seconds": result.train_seconds, "waited_s": waited}))


if __name__ == "__main__":
    main()
