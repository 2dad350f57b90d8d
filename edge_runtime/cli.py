"""`fftmoe device`: the on-device command line. Imports only the torch-free edge runtime.

Subcommands:
  run     (the default) join a federation: train on local data each round, upload over MQTT
  probe   verify a tier's artifacts against the manifest and measure its training step here
          (peak RSS, step time), the numbers that decide which tier a device can run
  doctor  check an installed device (Python, training runtime, artifacts, broker, free RAM) and
          say what to fix; exit 0 when no check fails (edge_runtime/doctor.py)

Exit codes of `run`: 0 stopped cleanly (SIGTERM); 2 bad configuration; 3 artifacts missing or
corrupt; 4 local data unusable; 5 state file corrupt.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_USAGE = 2
SUBCOMMANDS = ("run", "probe", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe device", description="On-device commands (torch-free).",
                                     epilog="Exit codes of run: 0 clean stop, 2 bad configuration, 3 artifacts "
                                            "missing or corrupt, 4 local data unusable, 5 state file corrupt.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a federation and train each round (default)")
    run.add_argument("--config", help="device TOML file (keys as the flags below, with underscores)")
    for flag, help_ in (("--device-id", "this device's id"), ("--artifacts", "export folder with manifest.json"),
                        ("--tier", "tier to train"), ("--data", "local data file (CSV, JSON Lines, Parquet)"),
                        ("--federation", "federation name (default 'default')"),
                        ("--broker", "broker URL, mqtt://host:1883 or mqtts://host:8883"),
                        ("--ca-file", "CA certificate for TLS"), ("--cert-file", "client certificate"),
                        ("--key-file", "client key"), ("--username", "broker user name"),
                        ("--password-file", "file holding the broker password"),
                        ("--profile", "hardware profile name announced to the server"),
                        ("--text-column", "text column (default 'text')"),
                        ("--label-column", "label column (default 'label')"),
                        ("--state-dir", "folder for durable local state")):
        run.add_argument(flag, help=help_)
    run.add_argument("--holdout-fraction", type=float, help="held-out share of local data (default 0.2)")
    run.add_argument("--threads", type=int, help="ORT intra-op threads (default 2)")
    run.add_argument("--seed", type=int)
    run.add_argument("--chunk-size", type=int, help="MQTT payload size in bytes (default 262144)")
    run.add_argument("--personal-router", action="store_true", default=None,
                     help="keep this device's router rows locally (pair with the server's --personalise-router)")
    run.add_argument("--label-count-epsilon", type=float,
                     help="when the server asks for label counts, send one epsilon-differentially-private release "
                          "of them instead of the exact counts (drawn once, kept in the state folder)")
    run.add_argument("--max-rounds", type=int, help="exit after serving this many rounds (default: run forever)")
    run.add_argument("--emulate", metavar="PROFILE", help="emulate a hardware profile (a name from `fftmoe profiles` "
                     "or a profile TOML file): threads, memory ceiling, link, availability, emulated time")
    run.add_argument("--host-core-gflops", type=float, help="calibrated speed of one host core (emulation; "
                     "`fftmoe profiles` measures it)")
    run.add_argument("--memory-limit-mb", type=float, help="override the emulated memory ceiling")
    run.add_argument("--log-level", default="INFO")
    probe = sub.add_parser("probe", help="verify a tier's artifacts and measure one training step on this device")
    probe.add_argument("--artifacts", required=True, help="export folder (with manifest.json)")
    probe.add_argument("--tier", required=True, help="tier name from the manifest")
    probe.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    probe.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    from edge_runtime import doctor

    doctor.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = build_parser().parse_args(argv)
    if args.command == "probe":
        return _probe(args)
    if args.command == "doctor":
        from edge_runtime import doctor

        return doctor.main(args)
    return _run(args)


def _fail(message: str, code: int) -> int:
    print(f"fftmoe device: error: {message}", file=sys.stderr)
    return code


def _run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_runtime import agent
    from edge_runtime.device_config import DeviceConfigError, load_device_config
    from edge_runtime.emulation import EmulationError, MemoryWatchdog
    from edge_runtime.local_data import LocalDataError, LocalDataset, TextEncoder
    from edge_runtime.local_state import LocalState, StateFileError
    from edge_runtime.manifest import ArtifactIntegrityError, ManifestError
    from edge_runtime.mqtt import BrokerConfig, BrokerConfigError
    from edge_runtime.trainer import TierTrainer

    local = ("command", "config", "max_rounds", "log_level", "emulate", "host_core_gflops", "memory_limit_mb")
    overrides = {k: v for k, v in vars(args).items() if k not in local}
    emulation = None
    try:
        if args.emulate:
            emulation = _emulation(args)
            overrides["threads"] = emulation.threads(args.threads or 2)
            overrides["profile"] = overrides.get("profile") or emulation.profile
        config = load_device_config(args.config, overrides)
        broker = BrokerConfig.from_url(config.broker, ca_file=config.ca_file, cert_file=config.cert_file,
                                       key_file=config.key_file, username=config.username,
                                       password=config.password())
    except (DeviceConfigError, BrokerConfigError, EmulationError) as err:
        return _fail(str(err), agent.EXIT_CONFIG)
    if emulation is not None:
        MemoryWatchdog(emulation.memory_limit_mb).start()
        logging.getLogger("fftmoe.device").info(
            "emulating %s: %d threads, %.0f MB memory, %.3g GFLOPS/core (host %.3g), links %g/%g Mbps, %g ms, "
            "availability %.2f", emulation.profile, config.threads, emulation.memory_limit_mb, emulation.core_gflops,
            emulation.host_core_gflops, emulation.uplink_mbps, emulation.downlink_mbps, emulation.latency_ms,
            emulation.availability)
    try:
        trainer = TierTrainer(config.artifacts, config.tier, threads=config.threads, spinning=emulation is None)
    except (ManifestError, ArtifactIntegrityError) as err:
        return _fail(str(err), agent.EXIT_ARTIFACTS)
    try:
        encoder = TextEncoder(trainer.folder / "tokenizer.json", trainer.tier.seq_len)
        dataset = LocalDataset(config.data, labels=trainer.manifest.labels, encoder=encoder,
                               text_column=config.text_column, label_column=config.label_column,
                               holdout_fraction=config.holdout_fraction, seed=config.seed)
    except LocalDataError as err:
        return _fail(str(err), agent.EXIT_DATA)
    try:
        device = agent.DeviceAgent(config, trainer, dataset, LocalState(config.state_dir), broker, emulation)
    except StateFileError as err:
        return _fail(str(err), agent.EXIT_STATE)
    agent.install_signal_handlers(device)
    return device.run(max_rounds=args.max_rounds)


def _emulation(args):
    """The Emulation for --emulate NAME|FILE. Built-in names are files of the hw_profiles package,
    located without importing it (the device runtime imports nothing of fftmoe outside itself)."""
    import importlib.util
    from pathlib import Path

    from edge_runtime.emulation import Emulation, EmulationError

    path = Path(args.emulate)
    if not path.suffix:
        spec = importlib.util.find_spec("hw_profiles")
        folders = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
        path = Path(folders[0]) / "profiles" / f"{args.emulate}.toml" if folders else path
    if not path.is_file():
        raise EmulationError(f"no hardware profile {args.emulate!r} (see `fftmoe profiles`, or give a TOML file)")
    if args.host_core_gflops is None:
        raise EmulationError("--emulate needs --host-core-gflops (the speed of one host core; `fftmoe profiles` "
                             "prints it)")
    return Emulation.from_profile_file(path, args.host_core_gflops, args.memory_limit_mb)


def _probe(args) -> int:
    from edge_runtime.manifest import ArtifactIntegrityError, ManifestError, load_manifest, verify_tier

    try:
        manifest = load_manifest(args.artifacts)
        tier = verify_tier(manifest, args.tier)
    except (ManifestError, ArtifactIntegrityError) as err:
        return _fail(str(err), EXIT_USAGE)
    from edge_runtime import step_probe

    tier_dir = manifest.root / tier.name
    return step_probe.main([str(tier_dir), "--batch", str(tier.batch_size), "--seq", str(tier.seq_len),
                            "--vocab", str(manifest.backbone["vocab_size"]),
                            "--het-shape", f"{len(tier.adapted_layers)},{tier.experts_held}",
                            "--labels", str(len(manifest.labels)), "--threads", str(args.threads),
                            "--steps", str(args.steps)])


if __name__ == "__main__":
    sys.exit(main())
