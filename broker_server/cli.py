"""`fftmoe serve`: run the aggregation server, with the embedded broker unless --broker is given.

`--workers N` makes it the coordinator of N or more `fftmoe serve --worker` processes, which receive
and fold the updates (sharded aggregation, broker_server/coordinator.py and workers.py); a worker
takes the same artifacts, federation and broker flags.

Exit codes: 0 the configured rounds are complete (or stopped by SIGTERM); 2 bad configuration;
3 artifacts missing or corrupt; 5 state folder unreadable or unwritable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

EXIT_CONFIG, EXIT_ARTIFACTS, EXIT_STATE = 2, 3, 5


def build_parser() -> argparse.ArgumentParser:
    from broker_server.config import recipe_flags

    parser = argparse.ArgumentParser(prog="fftmoe serve", description="Run FFT-MoE aggregation rounds over MQTT.",
                                     epilog="Exit codes: 0 done, 2 bad configuration, 3 artifacts missing or "
                                            "corrupt, 5 state folder unusable.")
    parser.add_argument("--config", help="server TOML file (keys as the flags, with underscores)")
    parser.add_argument("--artifacts", help="export folder with manifest.json")
    parser.add_argument("--state-dir", help="durable state folder; an existing one is resumed")
    parser.add_argument("--federation")
    parser.add_argument("--broker", help="external broker URL (mqtt://host:1883, mqtts://...); default: embedded")
    parser.add_argument("--host", help="embedded broker bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="embedded broker port (default 1883, 0 for any)")
    for flag in ("--ca-file", "--cert-file", "--key-file", "--username", "--password-file", "--upload-dtype",
                 "--weighting", "--optimizer", "--norm-policy", "--method"):
        parser.add_argument(flag)
    for flag in ("--rounds", "--min-devices", "--min-participants", "--min-updates", "--local-steps", "--seed",
                 "--max-attempts"):
        parser.add_argument(flag, type=int)
    for flag in ("--fraction", "--round-deadline-s", "--learning-rate", "--lambda-bal", "--lambda-het", "--gamma",
                 "--server-lr", "--router-lr", "--slot-keep", "--clip-multiplier"):
        parser.add_argument(flag, type=float)
    parser.add_argument("--recipe", help="named settings under the file and the flags: paper (default) or "
                        f"label-aware ({recipe_flags('label-aware')}: for label-skewed fleets; devices then report "
                        "their label counts)")
    parser.add_argument("--logit-prior", type=float, metavar="TAU",
                        help="devices train with TAU x log of their own label prior added to the logits (balanced "
                             "softmax; default 0: plain cross-entropy)")
    parser.add_argument("--personalise-router", action="store_true", default=None)
    parser.add_argument("--own-labels-only", action="store_true", default=None,
                        help="devices update only the head rows of labels they have samples of")
    parser.add_argument("--head-weighting",
                        help="head row y averaged with weights |D_n| (samples, default) or each device's samples "
                             "of label y (labels: devices report their label counts)")
    parser.add_argument("--exact", action="store_true", default=None,
                        help="exact integer aggregation: the same bits in any update order (what --workers uses)")
    parser.add_argument("--workers", type=int, help="coordinate this many aggregator workers (default 0: fold here)")
    parser.add_argument("--close-timeout-s", type=float, help="seconds a worker has to send its partial sums")
    parser.add_argument("--worker", action="store_true", help="run as an aggregator worker of a coordinator")
    parser.add_argument("--worker-name", help="this worker's id (default host-pid)")
    parser.add_argument("--model-out", metavar="DIR",
                        help="when the rounds are done, write the served global model to DIR (model.onnx, "
                             "tokenizer.json, labels.json: what `fftmoe predict` reads)")
    parser.add_argument("--test-data", metavar="FILE",
                        help="labelled held-out data (CSV / JSON Lines / Parquet, columns text and label): the "
                             "global model's test accuracy after each round, in metrics.jsonl")
    parser.add_argument("--audit-log", action="store_true", default=None,
                        help="log every folded update under STATE/audit/ so the global model can be replayed")
    parser.add_argument("--log-level", default="INFO")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"fftmoe serve: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from broker_server.config import ServerConfigError, load_server_config
    from broker_server.embedded_broker import EmbeddedBroker, EmbeddedBrokerError
    from broker_server.server import AggregationServer
    from broker_server.state import StateError, StateStore
    from edge_runtime.manifest import ArtifactIntegrityError, ManifestError, load_manifest, verify_files
    from edge_runtime.mqtt import BrokerConfig, BrokerConfigError

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "log_level", "worker", "worker_name")}
    try:
        config = load_server_config(args.config, overrides)
    except ServerConfigError as err:
        return _fail(str(err), EXIT_CONFIG)
    try:
        manifest = load_manifest(config.artifacts)
        verify_files(manifest, [manifest.global_init])
    except (ManifestError, ArtifactIntegrityError) as err:
        return _fail(str(err), EXIT_ARTIFACTS)
    if args.worker:
        return _run_worker(config, manifest, args.worker_name)
    store = StateStore(config.state_dir)
    embedded = None
    try:
        store.check_writable()
        if config.broker is None:
            embedded = EmbeddedBroker(config.host, config.port).start()
            broker = BrokerConfig(host=config.host, port=embedded.port)
        else:
            broker = _external_broker(config)
        if config.workers:
            from broker_server.coordinator import CoordinatorServer

            server = CoordinatorServer(config, manifest, store, broker)
        else:
            server = AggregationServer(config, manifest, store, broker)
        served = _served_model(config, manifest, server)
    except StateError as err:
        return _fail(str(err), EXIT_STATE)
    except (BrokerConfigError, EmbeddedBrokerError, ServerConfigError, ValueError) as err:
        if embedded is not None:
            embedded.stop()  # the serving tier's files are checked last, after the broker started
        return _fail(str(err), EXIT_ARTIFACTS if isinstance(err, ArtifactIntegrityError) else EXIT_CONFIG)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    try:
        code = server.run()
        if code == 0 and served is not None and config.model_out:
            state = store.load()
            if state is not None:
                path = served.export(state.global_arrays, Path(config.model_out))
                logging.getLogger("fftmoe.server").info("served model after %d rounds written to %s", state.round, path)
        return code
    except StateError as err:
        return _fail(str(err), EXIT_STATE)
    finally:
        if embedded is not None:
            embedded.stop()


def _served_model(config, manifest, server):
    """The GlobalModel `--model-out` and `--test-data` need, with `server.evaluate` set for the latter;
    None without them. ServerConfigError for a missing package or unusable test data."""
    if not (config.model_out or config.test_data):
        return None
    from broker_server.config import ServerConfigError
    from edge_runtime.manifest import verify_files

    try:
        from broker_server.global_model import GlobalModel, serving_tier
        from edge_runtime.local_data import LocalDataError
    except ImportError as err:
        raise ServerConfigError(f"--model-out and --test-data run the global model, which needs onnxruntime-training "
                                f"and tokenizers ({err}); pip install 'fftmoe[edge]' on this host") from None
    verify_files(manifest, list(manifest.tier(serving_tier(manifest)).files.values()))
    try:
        model = GlobalModel(manifest, Path(config.test_data) if config.test_data else None, server.method)
    except LocalDataError as err:
        raise ServerConfigError(f"--test-data: {err}") from None
    if config.test_data:
        server.evaluate = model.evaluate
    return model


def _external_broker(config):
    from edge_runtime.mqtt import BrokerConfig

    return BrokerConfig.from_url(config.broker, ca_file=config.ca_file, cert_file=config.cert_file,
                                 key_file=config.key_file, username=config.username, password=config.password())


def _run_worker(config, manifest, name: str | None) -> int:
    """`--worker`: fold the updates a coordinator sends this process's lane, until SIGTERM."""
    from broker_server.config import ServerConfigError
    from broker_server.workers import AggregatorWorker, default_worker_id
    from edge_runtime import wire
    from edge_runtime.mqtt import BrokerConfigError

    if config.broker is None:
        return _fail("a worker connects to its coordinator's broker: give --broker mqtt://HOST:PORT (the "
                     "coordinator's embedded broker prints its address, or use mosquitto)", EXIT_CONFIG)
    if config.workers:
        return _fail("--worker and --workers exclude each other: a worker folds, a coordinator has workers",
                     EXIT_CONFIG)
    try:
        worker = AggregatorWorker(name or default_worker_id(), config.federation, manifest, _external_broker(config),
                                  config.chunk_size)
    except (BrokerConfigError, ServerConfigError, wire.WireError) as err:
        return _fail(str(err), EXIT_CONFIG)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
