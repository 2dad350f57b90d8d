"""The two reference points of `fftmoe bench accuracy`: local-only training and a centralised run.

`python -m hw_profiles.references local|central [fftmoe run flags] --out DIR` sees exactly the data
and tiers `fftmoe run` would (it reuses `run.export_cached`, `run.assign_tiers` and
`run.prepare_data` with the same flags) and writes a run-like folder: `metrics.jsonl` with one record
per round-equivalent, `fleet.json` (method "local" or "central") and the usual report.

- local: every device trains the FFT-MoE adapters of its own tier on its own shard, `rounds x
  local_steps` steps with the optimiser reset every `local_steps` (as a device does each round), never
  aggregated. After each round-equivalent each device is evaluated on the global test split and on its
  own held-out split; `test_accuracy` is the mean over devices (per device under "devices").
- central: one client on the serving tier (the largest) holding every device's training rows, trained
  for `rounds x local_steps x devices` steps (as many batches as the fleet processes) with one
  optimiser, evaluated every `local_steps x devices` steps.

Devices train one after another, one trainer alive at a time, so memory stays at one tier's. Nothing
is sent anywhere: bytes are 0 and there is no emulated time. The heterogeneity target q comes from the
client's own last-round expert usage in place of the fleet's. This is not a federation and not a
baseline method (FedIT / HetLoRA / FlexLoRA run through `fftmoe run --method`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("local", "central")
EVAL_BATCH = 32
HOLDOUT_FRACTION = 0.2  # what `fftmoe run` gives each device (--holdout-fraction 0.2)


def _step(mode: str, message: str) -> None:
    print(f"[{mode}] {message}", file=sys.stderr, flush=True)


def _setup(args, fleet, out: Path, mode: str):
    """(manifest, members, data) exactly as `fftmoe run` would build them for these flags."""
    from edge_runtime.manifest import load_manifest
    from hw_profiles.profiles import calibrate_host_core_gflops
    from hw_profiles.run import assign_tiers, export_cached, prepare_data

    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(export_cached(args))
    members = assign_tiers(fleet, manifest, args, calibrate_host_core_gflops())
    data = prepare_data(args, [m.device_id for m, _, _ in members], out / "data")
    _step(mode, f"data: {data.train_size} training samples over {len(members)} devices "
                f"({_partition_name(args)}), {data.test_size} test samples")
    return manifest, members, data


def _partition_name(args) -> str:
    return f"dirichlet({args.alpha})" if args.partition == "dirichlet" else "iid"


def _threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _initial_arrays(manifest, tier, nth_fresh: int) -> tuple[dict[str, np.ndarray], dict[int, list[int]]]:
    """(arrays, slot map) the server would send in round 0: global_init gathered through a round-0 slot map."""
    from broker_server.aggregation import ParamSpace
    from broker_server.slots import SlotPlanner

    planner = SlotPlanner(manifest.experts, {})
    planner.fresh = nth_fresh  # the spreading offset of the nth device without history
    slot_map = planner.assign(list(tier.adapted_layers), tier.experts_held, None)
    with np.load(manifest.root / manifest.global_init.path, allow_pickle=False) as init:
        arrays = ParamSpace(manifest.global_params).gather_slots({k: init[k] for k in init.files}, slot_map)
    return {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}, slot_map


def _q(tokens: np.ndarray | None, layers: int, held: int) -> np.ndarray:
    """q [L_t, M_t] from the client's own last-round token counts (uniform before any round)."""
    from broker_server.aggregation import het_target

    if tokens is None or not np.any(tokens > 0):
        return np.full((layers, held), 1.0 / held, dtype=np.float32)
    share = tokens / np.maximum(tokens.sum(axis=1, keepdims=True), 1.0)  # [L_t, M_t]
    return np.stack([het_target(share[i], list(range(held))) for i in range(layers)]).astype(np.float32)


def _entropy(by_layer: dict[int, np.ndarray]) -> float | None:
    """Mean over layers of the entropy (nats) of the token share over global experts, as the server logs it."""
    from broker_server.aggregation import share_entropy

    values = [e for e in map(share_entropy, by_layer.values()) if e is not None]
    return float(np.mean(values)) if values else None


def _add_tokens(by_layer: dict[int, np.ndarray], slot_map, tokens: np.ndarray, experts: int) -> None:
    for i, layer in enumerate(sorted(slot_map)):
        acc = by_layer.setdefault(layer, np.zeros(experts))
        acc[list(slot_map[layer])] += tokens[i]  # [M]


def _datasets(manifest, folder: Path, seq_len: int, path: Path, seed: int, holdout: float):
    from edge_runtime.local_data import LocalDataset, TextEncoder

    encoder = TextEncoder(folder / "tokenizer.json", seq_len)
    return LocalDataset(path, labels=manifest.labels, encoder=encoder, holdout_fraction=holdout, seed=seed)


def local_only(args, fleet, out: Path) -> Path:
    """Each device trains alone on its shard; returns the run folder. See the module docstring."""
    from edge_runtime.trainer import LossInputs, TierTrainer, take_steps

    manifest, members, data = _setup(args, fleet, out, "local")
    n, rounds = len(members), args.rounds
    per_device: list[list[dict]] = []
    tokens_by_round = [dict() for _ in range(rounds)]  # round -> layer -> [M] tokens over the fleet
    tests: dict[int, object] = {}
    for index, (member, _, tier_name) in enumerate(members):
        trainer = TierTrainer(manifest.root, tier_name, threads=_threads(), verify=False)
        tier, seed = trainer.tier, args.seed * 1000 + index
        own = _datasets(manifest, trainer.folder, tier.seq_len, data.paths[member.device_id], seed, HOLDOUT_FRACTION)
        if tier.seq_len not in tests:
            tests[tier.seq_len] = _datasets(manifest, trainer.folder, tier.seq_len, data.paths["test"], 0, 0.0)
        test = tests[tier.seq_len]
        rng = np.random.default_rng(seed)  # the batch order the device process would draw
        arrays, slot_map = _initial_arrays(manifest, tier, index)
        tokens, records = None, []
        for r in range(rounds):
            started = time.perf_counter()
            batches = take_steps(lambda: own.batches(tier.batch_size, rng), args.local_steps)
            loss = LossInputs(args.lambda_bal, args.lambda_het, _q(tokens, len(tier.adapted_layers), tier.experts_held))
            result = trainer.train_round(arrays, batches, loss, args.learning_rate, reset_optimizer=True)
            arrays, tokens = result.params, result.expert_tokens.astype(np.float64)  # [L_t, M_t]
            _add_tokens(tokens_by_round[r], slot_map, tokens, manifest.experts)
            test_loss, test_acc, _ = trainer.evaluate(test.batches(EVAL_BATCH, np.random.default_rng(0)))
            _, hold_acc, hold_n = trainer.evaluate(own.holdout_batches(EVAL_BATCH))
            records.append({"status": "ok", "profile": member.profile, "tier": tier_name, "bytes_up": 0,
                            "bytes_down": 0, "test_accuracy": test_acc, "test_loss": test_loss,
                            "holdout_accuracy": hold_acc if hold_n else None, "holdout_samples": hold_n,
                            "train_loss": result.loss, "train_samples": own.train_size,
                            "wall_s": round(time.perf_counter() - started, 3)})
            _step("local", f"{member.device_id} ({member.profile}, tier {tier_name}) round {r + 1}/{rounds}: "
                           f"test {test_acc:.3f}, held-out {_fmt(records[-1]['holdout_accuracy'])} "
                           f"({records[-1]['wall_s']:.1f} s)")
        per_device.append(records)
        del trainer  # one ORT session alive at a time
    lines = []
    for r in range(rounds):
        devs = {m.device_id: per_device[i][r] for i, (m, _, _) in enumerate(members)}
        held = [(d["holdout_accuracy"], d["holdout_samples"]) for d in devs.values()
                if d["holdout_accuracy"] is not None]
        lines.append({"round": r, "participants": n, "updates": n, "bytes_up": 0, "bytes_down": 0,
                      "emulated_round_s": None, "wall_round_s": None,
                      "test_accuracy": float(np.mean([d["test_accuracy"] for d in devs.values()])),
                      "test_loss": float(np.mean([d["test_loss"] for d in devs.values()])),
                      "device_holdout_accuracy": float(np.average([a for a, _ in held], weights=[w for _, w in held]))
                      if held and sum(w for _, w in held) else None,
                      "usage_entropy": _entropy(tokens_by_round[r]), "devices": devs})
    devices = [{"device_id": m.device_id, "profile": m.profile, "tier": t, "train_samples": int(len(shard))}
               for (m, _, t), shard in zip(members, data.shards)]  # shard sizes, as `fftmoe run` writes them
    _finish(out, args, manifest, data, "local", devices, lines)
    return out


def _central_files(manifest, data, members, args, folder: Path) -> tuple[Path, Path]:
    """Every device's training rows in one CSV, every device's held-out rows in another (the same
    rows the device processes of `fftmoe run` train on and hold out)."""
    from edge_runtime.local_data import encode_labels, load_records, split_holdout
    from hw_profiles.partition import write_csv

    train_rows, held_rows = [], []
    for index, (member, _, _) in enumerate(members):
        path = data.paths[member.device_id]
        records = load_records(path)
        labels = encode_labels(records, manifest.labels, path)  # [N]
        train, held = split_holdout(len(records), HOLDOUT_FRACTION, args.seed * 1000 + index, labels)
        train_rows += [records[i] for i in train]
        held_rows += [records[i] for i in held]
    paths = folder / "central-train.csv", folder / "central-holdout.csv"
    for path, rows in zip(paths, (train_rows, held_rows)):
        write_csv(path, [(r.text, r.label) for r in rows])
    return paths


def centralised(args, fleet, out: Path) -> Path:
    """One client on the serving tier with all training data; returns the run folder."""
    from edge_runtime.trainer import LossInputs, TierTrainer, take_steps
    from broker_server.global_model import serving_tier

    manifest, members, data = _setup(args, fleet, out, "central")
    tier_name = serving_tier(manifest)
    trainer = TierTrainer(manifest.root, tier_name, threads=_threads(), verify=False)
    tier = trainer.tier
    train_path, held_path = _central_files(manifest, data, members, args, out / "data")
    train = _datasets(manifest, trainer.folder, tier.seq_len, train_path, 0, 0.0)
    held = _datasets(manifest, trainer.folder, tier.seq_len, held_path, 0, 0.0)
    test = _datasets(manifest, trainer.folder, tier.seq_len, data.paths["test"], 0, 0.0)
    arrays, slot_map = _initial_arrays(manifest, tier, 0)
    rng = np.random.default_rng(args.seed)
    steps = args.local_steps * len(members)  # per round-equivalent: what the whole fleet does in a round
    tokens, lines = None, []
    for r in range(args.rounds):
        started = time.perf_counter()
        batches = take_steps(lambda: train.batches(tier.batch_size, rng), steps)
        loss = LossInputs(args.lambda_bal, args.lambda_het, _q(tokens, len(tier.adapted_layers), tier.experts_held))
        result = trainer.train_round(arrays, batches, loss, args.learning_rate, reset_optimizer=(r == 0))
        arrays, tokens = result.params, result.expert_tokens.astype(np.float64)  # [L_t, M_t]
        by_layer: dict[int, np.ndarray] = {}
        _add_tokens(by_layer, slot_map, tokens, manifest.experts)
        test_loss, test_acc, _ = trainer.evaluate(test.batches(EVAL_BATCH, np.random.default_rng(0)))
        _, hold_acc, hold_n = trainer.evaluate(held.batches(EVAL_BATCH, np.random.default_rng(0)))
        wall = round(time.perf_counter() - started, 3)
        lines.append({"round": r, "participants": 1, "updates": 1, "bytes_up": 0, "bytes_down": 0,
                      "emulated_round_s": None, "wall_round_s": wall, "test_accuracy": test_acc, "test_loss": test_loss,
                      "device_holdout_accuracy": hold_acc if hold_n else None, "usage_entropy": _entropy(by_layer),
                      "devices": {"central": {"status": "ok", "tier": tier_name, "profile": "central", "bytes_up": 0,
                                              "bytes_down": 0, "holdout_accuracy": hold_acc if hold_n else None,
                                              "train_loss": result.loss, "steps": result.steps}}})
        _step("central", f"round-equivalent {r + 1}/{args.rounds} ({steps} steps, tier {tier_name}): "
                         f"test {test_acc:.3f}, held-out {_fmt(lines[-1]['device_holdout_accuracy'])} ({wall:.1f} s)")
    devices = [{"device_id": "central", "profile": "central", "tier": tier_name, "train_samples": train.train_size}]
    _finish(out, args, manifest, data, "central", devices, lines)
    return out


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _finish(out: Path, args, manifest, data, method: str, devices: list[dict], lines: list[dict]) -> None:
    """fleet.json, then metrics.jsonl (written whole, then renamed), then the usual report."""
    from edge_runtime.local_state import atomic_write_bytes
    from hw_profiles.report import write_report

    fleet_info = {"devices": devices, "experts": manifest.experts, "labels": list(manifest.labels), "method": method,
                  "dataset": data.dataset.source, "partition": _partition_name(args), "seed": args.seed,
                  "rounds": args.rounds, "local_steps": args.local_steps}
    (out / "fleet.json").write_text(json.dumps(fleet_info, indent=1) + "\n")
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    atomic_write_bytes(out / "metrics.jsonl", text.encode())
    try:
        write_report(out)
    except ImportError:  # matplotlib missing: the metrics are what matters here
        pass


def main(argv: list[str] | None = None) -> int:
    """`python -m hw_profiles.references local|central [fftmoe run flags] --out DIR`. Exit 0, or 2 on bad input."""
    from edge_runtime.local_data import LocalDataError
    from hw_profiles.fleet import FleetError, parse_fleet
    from hw_profiles.partition import PartitionError
    from hw_profiles.profiles import ProfileError
    from hw_profiles.run import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODES:
        print(f"usage: python -m hw_profiles.references {{{'|'.join(MODES)}}} [fftmoe run options] --out DIR",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mode = argv[0]
    parser = build_parser()
    parser.prog = f"python -m hw_profiles.references {mode}"
    args = parser.parse_args(argv[1:])
    if args.out is None:
        parser.error("--out DIR is required")
    if args.rounds < 1 or args.local_steps < 1:
        parser.error("--rounds and --local-steps must be at least 1")
    if getattr(args, "method", "fft-moe") != "fft-moe":
        parser.error("the references train the FFT-MoE adapters; --method does not apply to them")
    try:
        fleet = parse_fleet(args.fleet)
        (local_only if mode == "local" else centralised)(args, fleet, args.out)
    except (FleetError, PartitionError, ProfileError, LocalDataError, RuntimeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    _step(mode, f"done: {args.out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
