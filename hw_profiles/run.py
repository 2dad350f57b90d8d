"""`fftmoe run`: a whole heterogeneous federation on one machine, with the real components.

Steps: export the model (cached by content hash, in a subprocess so torch never sits in this
process), partition the dataset into one CSV per device plus a global test split, start the
embedded broker, start one `fftmoe device run --emulate PROFILE` process per fleet member (each
with its profile's threads, memory ceiling, link and availability), then run the real aggregation
server in this process with a hook that measures test accuracy of the global model after every
round. It ends with the final global adapter, a ready-to-serve ONNX model, a report with plots and
a plain summary, all in the run folder. The server and devices are the ones `fftmoe serve` and
`fftmoe device` run; nothing here stands in for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np

from broker_server.config import HEAD_WEIGHTINGS, MAX_LOGIT_PRIOR, RECIPES, recipe_flags, recipe_settings
from broker_server.slots import DEFAULT_KEEP

log = logging.getLogger("fftmoe.run")


def build_parser() -> argparse.ArgumentParser:
    from hw_profiles.fleet import DEFAULT_FLEET

    p = argparse.ArgumentParser(prog="fftmoe run", description="Emulate a heterogeneous FFT-MoE federation on this "
                                "machine: export, partition, broker, server and one process per device.")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="paper",
                   help="named settings: paper (the defaults below) or label-aware (for label-skewed fleets: "
                        f"{recipe_flags('label-aware')}; devices then report their label counts); flags given "
                        "explicitly override it")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="backbone (default all-MiniLM-L6-v2, offline)")
    p.add_argument("--tiers", type=Path, help="tiers TOML (default: the built-in four tiers)")
    p.add_argument("--method", choices=("fft-moe", "fedit", "hetlora", "flexlora"), default="fft-moe",
                   help="FFT-MoE (default) or a LoRA baseline of METHOD.md on the same tiers, layers, data and fleet")
    p.add_argument("--weighting", choices=("samples", "activation"), default="samples",
                   help="FFT-MoE aggregation weights: samples (the paper's |D_n|) or tokens routed to each expert")
    p.add_argument("--personalise-router", action="store_true",
                   help="FFT-MoE: devices keep their own router rows; only experts and head are aggregated")
    p.add_argument("--serve-averaged-router", action="store_true",
                   help="with --personalise-router: the server still averages the devices' router rows into the "
                        "global model it evaluates and serves (devices keep using their own)")
    p.add_argument("--server-optimizer", choices=("fedavg", "fedadam"), default="fedavg",
                   help="FFT-MoE: server optimiser on the round's pseudo-gradient (default fedavg)")
    p.add_argument("--server-lr", type=float, default=1e-2, help="FedAdam's eta (default 1e-2)")
    p.add_argument("--router-lr", type=float, default=1.0,
                   help="FFT-MoE: server step on the router rows, 1 averages them (default), 0 keeps the global "
                        "gate where it is while devices still adapt theirs within a round")
    p.add_argument("--slot-keep", type=float, default=DEFAULT_KEEP,
                   help="FFT-MoE: share of a device's expert slots kept on the experts it used most last round "
                        f"(default {DEFAULT_KEEP}); the rest go to the fleet's least-used experts, 0 = all of them")
    p.add_argument("--artifacts", type=Path, help="use this export instead of the cached one")
    p.add_argument("--cache", type=Path, default=Path("artifacts/cache"), help="export cache folder")
    p.add_argument("--dataset", default="bbcnews", help="built-in name or a CSV / JSON Lines / Parquet file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--fleet", default=DEFAULT_FLEET, help=f"PROFILE:COUNT,... or a TOML file (default {DEFAULT_FLEET})")
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--round-budget-s", type=float, default=30.0,
                   help="emulated seconds of local training a round may take; picks each device's tier with its "
                        "memory (default 30)")
    p.add_argument("--device-tiers", metavar="TIER,...",
                   help="give dev0, dev1, ... these tiers (one per device) instead of choosing each from its memory "
                        "and the round budget; the choice rests on step times measured at export, so a benchmark "
                        "pins it to train the same fleet in every cell")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--lambda-bal", type=float, default=0.01)
    p.add_argument("--lambda-het", type=float, default=0.01)
    p.add_argument("--logit-prior", type=float, default=0.0, metavar="TAU",
                   help="devices train with TAU x log of their own label prior added to the logits (balanced "
                        "softmax; 0 = plain cross-entropy; default %(default)s)")
    p.add_argument("--own-labels-only", action="store_true",
                   help="devices update only the head rows of labels they have samples of")
    p.add_argument("--head-weighting", choices=HEAD_WEIGHTINGS, default="samples",
                   help="head row y averaged with weights |D_n| (samples, default) or each device's samples of "
                        "label y (labels: devices report their label counts)")
    p.add_argument("--label-count-epsilon", type=float, metavar="EPSILON",
                   help="with --head-weighting labels: each device sends one EPSILON-differentially-private "
                        "release of its label counts (drawn once) instead of the exact counts")
    p.add_argument("--upload-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--round-deadline-s", type=float, default=600.0, help="host wall-clock deadline per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument("--port", type=int, default=0, help="embedded broker port (default: any free port)")
    p.add_argument("--memory-limit-mb", type=float, help="override every device's memory ceiling (testing)")
    return p


def _step(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def export_cached(args) -> Path:
    """The export for (model, tiers, labels, seed, fftmoe version), made once and reused."""
    from hw_profiles.partition import load_dataset

    if args.artifacts is not None:
        return args.artifacts
    labels = load_dataset(args.dataset, args.text_column, args.label_column).label_names
    tiers_text = args.tiers.read_text(encoding="utf-8") if args.tiers else "default"
    adapters = _export_adapters(args)
    key = hashlib.sha256(json.dumps([args.model, tiers_text, list(labels), args.seed, version("fftmoe")]
                                    + ([adapters] if adapters else [])).encode())
    folder = args.cache / key.hexdigest()[:16]
    if (folder / "manifest.json").is_file():
        _step(f"export: cached at {folder}")
        return folder
    _step(f"export: {args.model} -> {folder} (first run only{'; ' + ' '.join(adapters) if adapters else ''})")
    cmd = [sys.executable, "-m", "fftmoe.cli", "export", "--model", args.model, "--out", str(folder),
           "--labels", ",".join(labels), "--seed", str(args.seed)] + (["--tiers", str(args.tiers)] if args.tiers else [])
    cmd += adapters
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:  # its table is progress: stdout stays the results
        raise RuntimeError("the export failed (see above)")
    return folder


def _export_adapters(args) -> list[str]:
    """Extra `fftmoe export` flags of the method: LoRA for the baselines, and FedIT's single rank (the
    smallest tier's, METHOD.md "Baselines")."""
    if args.method == "fft-moe":
        return []
    if args.method != "fedit":
        return ["--method", "lora"]
    from export.tiers import load_tiers  # tomllib only: no torch in this process

    spec = load_tiers(args.tiers)
    smallest = min(spec.tiers, key=lambda t: t.adapted_layers * t.experts_held)
    return ["--method", "lora", "--lora-rank", str(smallest.lora_rank)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with the --recipe's settings as defaults under the flags given explicitly."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)  # a bad --recipe choice exits here with argparse's message
    parser.set_defaults(**recipe_settings(first.recipe, first.method))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    moe_options = args.weighting != "samples" or args.personalise_router or args.router_lr != 1 \
        or args.server_optimizer != "fedavg" or args.slot_keep != DEFAULT_KEEP
    for bad, message in ((not args.server_lr > 0, f"--server-lr must be > 0, got {args.server_lr}"),
                         (not 0 <= args.router_lr <= 1, f"--router-lr must be in [0, 1], got {args.router_lr}"),
                         (not 0 <= args.slot_keep <= 1, f"--slot-keep must be in [0, 1], got {args.slot_keep}"),
                         (not 0 <= args.logit_prior <= MAX_LOGIT_PRIOR,
                          f"--logit-prior must be in [0, {MAX_LOGIT_PRIOR:g}], got {args.logit_prior}"),
                         (args.router_lr != 1 and args.server_optimizer != "fedavg",
                          "--router-lr is a step of the fedavg server optimizer; drop it with --server-optimizer "
                          "fedadam" + (f" (the {args.recipe} recipe sets it; give --router-lr 1 to override)"
                                       if "router_lr" in RECIPES[args.recipe] else "")),
                         (args.label_count_epsilon is not None and not 0 < args.label_count_epsilon < np.inf,
                          f"--label-count-epsilon must be a positive finite number, got {args.label_count_epsilon}"),
                         (args.label_count_epsilon is not None and args.head_weighting != "labels",
                          "--label-count-epsilon goes with --head-weighting labels (only then do devices send "
                          "label counts)"),
                         (args.serve_averaged_router and not args.personalise_router,
                          "--serve-averaged-router goes with --personalise-router"),
                         (args.method != "fft-moe" and moe_options,
                          "--weighting, --personalise-router, --router-lr, --slot-keep and --server-optimizer are FFT-MoE "
                          "options; "
                          "the LoRA baselines run sample-weighted FedAvg as published")):
        if bad:
            print(f"fftmoe run: error: {message}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from hw_profiles.fleet import FleetError, parse_fleet
    from hw_profiles.partition import PartitionError
    from hw_profiles.profiles import ProfileError

    try:
        fleet = parse_fleet(args.fleet)
        return _run(args, fleet)
    except (FleetError, PartitionError, ProfileError, RuntimeError) as err:
        print(f"fftmoe run: error: {err}", file=sys.stderr)
        return 2


def _run(args, fleet) -> int:
    from broker_server.config import ServerConfig
    from broker_server.embedded_broker import EmbeddedBroker
    from broker_server.server import AggregationServer
    from broker_server.state import StateStore
    from edge_runtime.manifest import load_manifest
    from edge_runtime.mqtt import BrokerConfig
    from broker_server.global_model import GlobalModel, describe_serving
    from hw_profiles.profiles import calibrate_host_core_gflops, profile_path
    from hw_profiles.report import summary_lines, write_report

    started = time.perf_counter()
    run_dir = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(export_cached(args))
    host_gflops = calibrate_host_core_gflops()
    _step(f"host calibration: {host_gflops:.2f} GFLOPS per core (float32 matmul)")

    members = assign_tiers(fleet, manifest, args, host_gflops)
    data = prepare_data(args, [m.device_id for m, _, _ in members], run_dir / "data")
    dataset, shards, paths = data.dataset, data.shards, data.paths
    _step(f"data: {dataset.source}, {data.train_size} training samples over {len(members)} devices "
          f"({args.partition}{f' alpha={args.alpha}' if args.partition == 'dirichlet' else ''}, label skew "
          f"TV {data.skew['mean_tv']:.2f}), {data.test_size} held-out test samples")
    fleet_info = {"devices": [{"device_id": m.device_id, "profile": m.profile, "tier": tier,
                               "train_samples": int(len(shard))} for (m, _, tier), shard in zip(members, shards)],
                  "experts": manifest.experts, "layers": sorted({p.layer for p in manifest.global_params
                                                                   if p.layer is not None}),
                  "labels": list(manifest.labels), "method": args.method, "dataset": dataset.source,
                  "partition": f"dirichlet({args.alpha})" if args.partition == "dirichlet" else "iid",
                  "recipe": args.recipe, "label_count_epsilon": args.label_count_epsilon,
                  "served_model": describe_serving(manifest), "host_core_gflops": host_gflops}
    (run_dir / "fleet.json").write_text(json.dumps(fleet_info, indent=1) + "\n")
    for d in fleet_info["devices"]:
        _step(f"  {d['device_id']}: {d['profile']:<12} tier {d['tier']:<7} {d['train_samples']} samples")

    broker = EmbeddedBroker(port=args.port).start()
    devices: dict[str, subprocess.Popen] = {}
    logs = run_dir / "devices"
    logs.mkdir(exist_ok=True)
    try:
        for index, (m, profile, tier) in enumerate(members):
            cmd = [sys.executable, "-m", "fftmoe.cli", "device", "run", "--device-id", m.device_id,
                   "--artifacts", str(manifest.root), "--tier", tier, "--data", str(paths[m.device_id]),
                   "--broker", broker.url, "--federation", "run", "--state-dir", str(logs / f"{m.device_id}-state"),
                   "--emulate", str(profile_path(m.profile)), "--host-core-gflops", f"{host_gflops:.4f}",
                   "--seed", str(args.seed * 1000 + index), "--holdout-fraction", "0.2"]  # own batches, dropouts
            if args.memory_limit_mb is not None:
                cmd += ["--memory-limit-mb", str(args.memory_limit_mb)]
            if args.personalise_router:
                cmd += ["--personal-router"]
            if args.label_count_epsilon is not None:
                cmd += ["--label-count-epsilon", repr(args.label_count_epsilon)]
            devices[m.device_id] = subprocess.Popen(cmd, stdout=open(logs / f"{m.device_id}.log", "w"),
                                                    stderr=subprocess.STDOUT)
        alive = _wait_until_loaded(devices, logs)
        if not alive:
            raise RuntimeError(f"every device failed to start; see {logs}")
        _step(f"{len(alive)} of {len(devices)} devices up; running {args.rounds} rounds")
        config = ServerConfig(artifacts=str(manifest.root), state_dir=str(run_dir / "state"), federation="run",
                              rounds=args.rounds, min_devices=len(alive), min_updates=1,
                              round_deadline_s=args.round_deadline_s, local_steps=args.local_steps,
                              learning_rate=args.learning_rate, lambda_bal=args.lambda_bal,
                              lambda_het=args.lambda_het, logit_prior=args.logit_prior,
                              own_labels_only=args.own_labels_only, head_weighting=args.head_weighting,
                              upload_dtype=args.upload_dtype, seed=args.seed,
                              method=args.method, weighting=args.weighting,
                              personalise_router=args.personalise_router and not args.serve_averaged_router,
                              router_lr=args.router_lr, optimizer=args.server_optimizer, server_lr=args.server_lr,
                              slot_keep=args.slot_keep, recipe=args.recipe)
        server = AggregationServer(config, manifest, StateStore(config.state_dir), BrokerConfig(port=broker.port))
        global_model = GlobalModel(manifest, paths["test"], server.method)
        server.evaluate = global_model.evaluate
        watcher = threading.Thread(target=_watch_devices, args=({d: devices[d] for d in alive}, server), daemon=True)
        watcher.start()
        server.run()
        state = StateStore(config.state_dir).load()
    finally:
        for process in devices.values():
            if process.poll() is None:
                process.terminate()
        for process in devices.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
    exits = {d: p.returncode for d, p in devices.items()}
    fleet_info["exit_codes"] = exits
    (run_dir / "fleet.json").write_text(json.dumps(fleet_info, indent=1) + "\n")
    (run_dir / "metrics.jsonl").write_text((run_dir / "state" / "metrics.jsonl").read_text())
    np.savez(run_dir / "global_adapter.npz", **state.global_arrays)
    model = global_model.export(state.global_arrays, run_dir / "model")
    write_report(run_dir)
    print("\n".join(summary_lines(run_dir)))
    oom = [d for d, code in exits.items() if code == 137]
    if oom:
        print(f"out-of-memory kills (emulated): {', '.join(oom)}")
    print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'}; model: {model}; "
          f"total wall time {time.perf_counter() - started:.0f} s)")
    print(f"try: fftmoe predict --model {model} \"Shares rose after the bank reported record profits\"")
    return 0


def assign_tiers(fleet, manifest, args, host_gflops: float) -> list[tuple]:
    """(member, profile, tier name) per fleet member: the tier `--device-tiers` pins, else the largest tier
    its memory and round budget allow; a device no tier fits still gets one (the smallest that fits its
    memory, else the smallest) and is announced as the straggler or the likely out-of-memory kill, as on
    the real board."""
    from hw_profiles.profiles import MEMORY_SAFETY, load_profile, tier_for

    pinned = pinned_tiers(args.device_tiers, fleet, manifest) if args.device_tiers else None
    members = []
    for index, m in enumerate(fleet):
        profile = load_profile(m.profile)
        if pinned:
            tier = pinned[index]
            rss = manifest.tier(tier).measured.get("peak_rss_mb", 0.0)
            if rss > profile.usable_ram_mb * MEMORY_SAFETY:
                _step(f"{m.device_id} ({m.profile}): --device-tiers gives it {tier}, whose {rss:.0f} MB peak does not "
                      f"fit its {profile.usable_ram_mb:.0f} MB of usable memory; it will most likely be killed")
            members.append((m, profile, tier))
            continue
        tier, reasons = tier_for(profile, manifest, round_budget_s=args.round_budget_s, host_core_gflops=host_gflops,
                                 local_steps=args.local_steps)
        if tier is None:
            by_size = sorted(manifest.training_tiers.values(), key=lambda t: t.trainable_params)
            fitting = [t for t in by_size if t.measured["peak_rss_mb"] <= profile.usable_ram_mb * MEMORY_SAFETY]
            tier = (fitting or by_size)[0].name
            if fitting:  # too slow for the budget in every tier: the smallest that fits, as the straggler
                _step(f"{m.device_id} ({m.profile}) is too slow for a {args.round_budget_s:.0f} s round in any tier; "
                      f"it gets the smallest, {tier}, and will be the straggler")
            else:  # emulate what would happen on the real board rather than refusing the fleet
                _step(f"{m.device_id} ({m.profile}): no tier fits its {profile.usable_ram_mb:.0f} MB of usable memory; "
                      f"it gets {tier} and will most likely be killed for running out of memory")
        members.append((m, profile, tier))
    return members


def pinned_tiers(text: str, fleet, manifest) -> list[str]:
    """`--device-tiers nano,small,...`: one device tier of the export per fleet member, in order."""
    from hw_profiles.fleet import FleetError

    names = [x.strip() for x in text.split(",")]
    if len(names) != len(fleet):
        raise FleetError(f"--device-tiers names {len(names)} tiers for a fleet of {len(fleet)} devices; "
                         "give one per device, in fleet order (dev0 first)")
    for index, name in enumerate(names):
        if name not in manifest.training_tiers:
            raise FleetError(f"--device-tiers: dev{index} gets {manifest.not_a_device_tier(name)}; device tiers of "
                             f"the export: {', '.join(manifest.training_tiers)}")
    return names


@dataclass(frozen=True)
class RunData:
    """A run's data: the dataset, one training shard per device (row indices), and the files written."""

    dataset: object  # partition.Dataset
    train_idx: np.ndarray
    test_idx: np.ndarray
    shards: list
    paths: dict  # device id -> its CSV, and "test" -> the global held-out split
    skew: dict

    @property
    def train_size(self) -> int:
        return len(self.train_idx)

    @property
    def test_size(self) -> int:
        return len(self.test_idx)


def prepare_data(args, device_ids: list[str], folder: Path) -> RunData:
    """Split off the global test set, partition the rest over `device_ids` and write the files. The same
    (dataset, partition, alpha, seed, test fraction) gives the same files, so runs of different methods
    and the references of `fftmoe bench accuracy` see identical data."""
    from hw_profiles.partition import load_dataset, partition, skew, split_test, write_shards

    dataset = load_dataset(args.dataset, args.text_column, args.label_column)
    train_idx, test_idx = split_test(dataset, args.test_fraction, args.seed)
    train_labels = [dataset.labels[i] for i in train_idx]
    shards = partition(train_labels, len(device_ids), args.partition, alpha=args.alpha, seed=args.seed)
    paths = write_shards(dataset, train_idx, shards, test_idx, folder, device_ids,
                         scheme=args.partition, alpha=args.alpha, seed=args.seed)
    return RunData(dataset, train_idx, test_idx, list(shards), paths, skew(shards, train_labels))


def _wait_until_loaded(devices: dict[str, subprocess.Popen], logs: Path, timeout: float = 300.0) -> list[str]:
    """Devices whose agent is up (its log says it is joining), skipping those that died."""
    deadline = time.monotonic() + timeout
    pending = set(devices)
    while pending and time.monotonic() < deadline:
        for device_id in sorted(pending):
            text = (logs / f"{device_id}.log").read_text(errors="replace")
            if "joining federation" in text:
                pending.discard(device_id)
            elif devices[device_id].poll() is not None:
                _step(f"{device_id} exited with code {devices[device_id].returncode} before joining: "
                      f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}")
                pending.discard(device_id)
        time.sleep(0.1)
    return [d for d, p in devices.items() if p.poll() is None]


def _watch_devices(devices: dict[str, subprocess.Popen], server) -> None:
    """Log device processes that die during the run (an emulated OOM kill exits with 137)."""
    reported = set()
    while not server.stopped:
        for device_id, process in devices.items():
            code = process.poll()
            if code is not None and device_id not in reported:
                reported.add(device_id)
                what = "killed: emulated out of memory" if code == 137 else f"exited with code {code}"
                server.min_devices = max(1, server.min_devices - 1)  # it will not come back: stop waiting for it
                _step(f"{device_id} {what}; the rounds go on with the {server.min_devices} left")
        time.sleep(0.5)
