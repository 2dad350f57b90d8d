"""The `fftmoe` console command: a thin dispatcher that imports each role only when it runs.

`fftmoe device ...` must start on a torch-free Raspberry Pi, so this module imports nothing heavy:
each subcommand names the module whose `main(argv)` handles it, imported after dispatch. When the
role's extra is not installed, the error names the extra to install.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help, extra that provides its dependencies)
COMMANDS = {
    "export": ("export.cli", "export a frozen encoder + MoE adapters to ORT training artifacts per tier", "export"),
    "device": ("edge_runtime.cli", "run a device: join a federation and train on local data (torch-free)", "edge"),
    "serve": ("broker_server.cli", "run the aggregation server (embedded MQTT broker unless --broker)", "server"),
    "run": ("hw_profiles.run", "emulate a heterogeneous federation on this machine (the main job)", "all"),
    "predict": ("edge_runtime.predict", "classify texts with the model a run produced", "edge"),
    "bench": ("fftmoe.bench", "benchmarks: train-step, aggregate, accuracy, fleet, emulation", "all"),
    "profiles": ("hw_profiles.cli", "list device profiles and the tier each maps to", "edge"),
    "bundle": ("hw_profiles.bundle", "build a self-contained device bundle (artifacts, config, install script, systemd unit)", "all"),
    "fleet": ("broker_server.fleet_cli", "provision a secure fleet for mosquitto: CA, certificates, credentials, ACL", "server"),
}

EXIT_USAGE = 2


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: fftmoe COMMAND [options]", "", "FFT-MoE: federated fine-tuning with sparse MoE adapters "
             "on edge devices.", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "Run `fftmoe COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"fftmoe {version('fftmoe')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fftmoe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module_name, _, extra = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("export", "edge_runtime", "broker_server", "hw_profiles", "fftmoe"):
            raise
        print(f"fftmoe {name}: missing dependency {err.name!r}; install it with: pip install 'fftmoe[{extra}]'",
              file=sys.stderr)
        return EXIT_USAGE
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
