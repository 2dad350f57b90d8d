"""`fftmoe bench emulation`: emulated compute time of the same work alone and with K devices sharing the host.

The same fixed work (STEPS training steps of one tier, one ORT thread, `hw_profiles/emulation_work.py`)
runs as device processes in three cases, interleaved in every repeat so the host's load hits all alike:
alone; K processes at once holding core slots, as emulated devices do (`edge_runtime/cpu_slots.py`);
and K processes at once without slots, time-slicing the cores. Each process's CPU seconds become
emulated seconds as a device of PROFILE reports them (`Emulation.compute_seconds` over the profile's
cores, with the host calibration `fftmoe run` uses). The table gives medians over the processes of
all repeats, and each case's emulated time as a ratio to alone. The slots are in a private folder, so
devices of a `fftmoe run` on this host do not take turns with these. It measures the emulation, not
the tier's speed (`fftmoe bench train-step`) nor a federation (`fftmoe run`).

Exit codes: 0 done; 1 a work process failed; 2 bad options or no usable export; 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

CASES = (("alone", "alone"), ("slots", "{k} devices, core slots"), ("no-slots", "{k} devices, no slots"))


class BenchError(ValueError):
    """A bad option or an unusable export; one line for the user, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fftmoe bench emulation", description="Emulated compute time of the same "
                                "training work alone, with K devices on core slots and with K time-slicing devices.")
    p.add_argument("--artifacts", type=Path, help="export folder (default: the cached export `fftmoe run` uses, "
                   "made first if missing)")
    p.add_argument("--tier", help="tier to train (default: the largest)")
    p.add_argument("--steps", type=int, default=10, help="training steps per process (default %(default)s)")
    p.add_argument("--devices", type=int, default=4, help="K, the concurrent processes (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three cases (default %(default)s)")
    p.add_argument("--profile", default="pi4-4gb", help="hardware profile emulated (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def resolve(args) -> tuple[Path, str]:
    """The export folder and tier to run; BenchError on a missing export or an unknown tier."""
    from edge_runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest
    from broker_server.global_model import largest_training_tier

    if args.artifacts is None:
        from hw_profiles.run import build_parser as run_parser, export_cached

        args.artifacts = export_cached(run_parser().parse_args([]))  # what `fftmoe run` with no options uses
    if not (args.artifacts / MANIFEST_NAME).is_file():
        raise BenchError(f"no export at {args.artifacts} ({MANIFEST_NAME} missing); run `fftmoe export` first")
    try:
        manifest = load_manifest(args.artifacts)
    except ManifestError as err:
        raise BenchError(str(err)) from None
    if args.tier is None:  # the most adapter weights: the heaviest step
        return args.artifacts, largest_training_tier(manifest)
    if args.tier not in manifest.training_tiers:
        raise BenchError(f"{manifest.not_a_device_tier(args.tier)} in {args.artifacts} "
                         f"(device tiers: {', '.join(manifest.training_tiers)})")
    return args.artifacts, args.tier


def _emulated(emulation, done: list[dict]) -> float:
    """Median emulated seconds over processes, as a device of the profile reports them (`agent.py`)."""
    return statistics.median(emulation.compute_seconds(d["cpu_seconds"], emulation.cpu_cores) for d in done)


def measure(artifacts: Path, tier: str, steps: int, devices: int, repeats: int, emulation) -> list[dict]:
    """One record per case: medians over its processes of all repeats, ratio of emulated time to alone."""
    from hw_profiles.emulation_work import run_copies

    runs: dict[str, list[dict]] = {case: [] for case, _ in CASES}
    with tempfile.TemporaryDirectory(prefix="fftmoe-bench-slots-") as slots_dir:
        for r in range(repeats):
            for case, label in CASES:
                copies = 1 if case == "alone" else devices
                _progress(f"repeat {r + 1}/{repeats}: {label.format(k=devices)}, {steps} steps of {tier} each "
                          f"(load average {os.getloadavg()[0]:.1f})")
                done = run_copies(artifacts, tier, steps, copies, slots_dir, slots=case != "no-slots",
                                  timeout=None)  # as long as the steps asked for take; Ctrl-C stops it
                runs[case] += done
                wall = statistics.median(d["wall_seconds"] for d in done)
                _progress(f"  emulated {_emulated(emulation, done):.2f} s, wall {wall:.2f} s")
    records = []
    for case, label in CASES:
        done = runs[case]
        records.append({"case": case, "label": label.format(k=devices), "processes": len(done),
                        "emulated_s": _emulated(emulation, done),
                        "cpu_s": statistics.median(d["cpu_seconds"] for d in done),
                        "wall_s": statistics.median(d["wall_seconds"] for d in done),
                        "waited_s": max(d["waited_s"] for d in done)})
    for record in records:
        record["ratio"] = record["emulated_s"] / records[0]["emulated_s"]
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_runtime.cpu_slots import host_cores
    from edge_runtime.emulation import Emulation, EmulationError
    from hw_profiles.emulation_work import WorkError
    from hw_profiles.profiles import ProfileError, calibrate_host_core_gflops, profile_path
    from fftmoe.tables import format_table

    try:
        if args.steps < 1 or args.devices < 2 or args.repeats < 1:
            raise BenchError("--steps and --repeats must be at least 1, --devices at least 2")
        artifacts, tier = resolve(args)
        host_gflops = calibrate_host_core_gflops()
        emulation = Emulation.from_profile_file(profile_path(args.profile), host_core_gflops=host_gflops)
    except (BenchError, ProfileError, EmulationError, RuntimeError) as err:
        print(f"fftmoe bench emulation: error: {err}", file=sys.stderr)
        return 2
    _progress(f"{artifacts} tier {tier}, {args.devices} devices on {host_cores()} host cores, emulating "
              f"{emulation.profile} ({emulation.cpu_cores} cores) at host {host_gflops:.2f} GFLOPS per core")
    try:
        records = measure(artifacts, tier, args.steps, args.devices, args.repeats, emulation)
    except WorkError as err:
        print(f"fftmoe bench emulation: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the running copies were killed on the way out (run_copies)
        print("fftmoe bench emulation: stopped", file=sys.stderr)
        return 130
    load = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps({"benchmark": "emulation", "artifacts": str(artifacts), "tier": tier, "steps": args.steps,
                          "devices": args.devices, "repeats": args.repeats, "profile": emulation.profile,
                          "host_cores": host_cores(), "host_core_gflops": host_gflops, "load_average": load,
                          "records": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                      for r in records]}))
        return 0
    rows = [(r["label"], f"{r['emulated_s']:.2f}", f"{r['ratio']:.3f}x ({100 * (r['ratio'] - 1):+.1f}%)",
             f"{r['wall_s']:.2f}", f"{r['waited_s']:.2f}") for r in records]
    print(format_table(("case", "emulated s", "vs alone", "wall s", "max waited s"), rows))
    print(f"{tier} x {args.steps} steps, {args.repeats} repeats, medians over processes; {emulation.profile} "
          f"emulated; {host_cores()} host cores, load average {load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min)")
    return 0
