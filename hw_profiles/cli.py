"""`fftmoe profiles`: list the device profiles and the exported tier each maps to; `show NAME` for one.

  fftmoe profiles [--artifacts DIR] [--round-budget S]   table of every built-in profile
  fftmoe profiles show NAME|FILE [...]                   every field with its sources, and the tier reasons

Also prints this host's calibrated core speed, which `fftmoe device run --emulate` takes as
--host-core-gflops. Exit codes: 0 done; 1 host calibration failed when a round budget needs it;
2 bad usage, unknown profile or invalid profile file. Never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fftmoe.tables import format_table
from hw_profiles import profiles as hp

EXIT_CALIBRATION = 1
EXIT_USAGE = 2
UNITS = {"cpu_ghz": "GHz", "ram_mb": "MB", "os_reserved_mb": "MB", "core_gflops": "GFLOPS (fp32, one core)",
         "uplink_mbps": "Mbit/s", "downlink_mbps": "Mbit/s", "latency_ms": "ms (one way)"}


def build_parser(show: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fftmoe profiles show" if show else "fftmoe profiles",
        description="One device profile: every field, its sources and its tier." if show else
        "Device profiles and the tier each maps to (`fftmoe profiles show NAME` for one).",
        epilog="Exit codes: 0 done, 1 host calibration failed, 2 bad usage or unknown/invalid profile.")
    if show:
        parser.add_argument("name", help="a built-in profile name or a profile TOML file")
    parser.add_argument("--artifacts", default="artifacts/default", help="export folder with manifest.json "
                        "(default artifacts/default)")
    parser.add_argument("--round-budget", type=float, metavar="S", help="also require --local-steps emulated "
                        "training steps to fit in S seconds")
    parser.add_argument("--local-steps", type=int, default=20, help="local steps per round (default 20)")
    parser.add_argument("--safety", type=float, default=hp.MEMORY_SAFETY,
                        help=f"share of usable RAM a tier may take (default {hp.MEMORY_SAFETY:g})")
    parser.add_argument("--threads", type=int, help="training threads on the device (default: all its cores)")
    parser.add_argument("--host-core-gflops", type=float, metavar="X", help="this host's core speed; skips calibration")
    parser.add_argument("--recalibrate", action="store_true", help="measure this host again instead of the cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show = bool(argv) and argv[0] == "show"
    if argv and argv[0] in ("show", "list"):
        argv = argv[1:]
    args = build_parser(show).parse_args(argv)
    if args.host_core_gflops is not None and not args.host_core_gflops > 0:
        print(f"fftmoe profiles: --host-core-gflops must be positive, got {args.host_core_gflops:g}", file=sys.stderr)
        return EXIT_USAGE
    try:
        selected = [hp.load_profile(args.name)] if show else hp.list_profiles()
    except hp.ProfileError as err:
        print(f"fftmoe profiles: {err}", file=sys.stderr)
        return EXIT_USAGE
    host, host_note = _host_gflops(args)
    if host is None and args.round_budget is not None:
        print(f"fftmoe profiles: {host_note}", file=sys.stderr)
        return EXIT_CALIBRATION
    manifest, manifest_note = _manifest(args.artifacts)
    try:
        if show:
            print(show_profile(selected[0], manifest, manifest_note, host, host_note, args))
        else:
            print(profile_table(selected, manifest, manifest_note, host, host_note, args))
    except ValueError as err:  # bad --safety / --local-steps / --round-budget / --threads
        print(f"fftmoe profiles: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _host_gflops(args) -> tuple[float | None, str]:
    if args.host_core_gflops is not None:
        return args.host_core_gflops, f"host: {args.host_core_gflops:g} GFLOPS per core (given)"
    try:
        gflops = hp.calibrate_host_core_gflops(refresh=args.recalibrate)
    except hp.CalibrationError as err:
        return None, str(err)
    return gflops, (f"host: {gflops:.1f} GFLOPS per core (fp32 256x256 matmul, 1 thread; cached in "
                    f"~/.cache/fftmoe/calibration.json, --recalibrate measures again)\n"
                    f"      emulate a device with `fftmoe device run --emulate NAME --host-core-gflops {gflops:.1f}`")


def _manifest(folder: str):
    from edge_runtime.manifest import ManifestError, load_manifest

    try:
        return load_manifest(folder), ""
    except ManifestError as err:
        how = ("run `fftmoe export` to write artifacts/default" if folder == "artifacts/default"
               else f"run `fftmoe export --out {folder}`")
        return None, f"no usable export in {folder} ({err}); {how}, or pass --artifacts DIR"


def _rule(args) -> str:
    rule = f"the largest tier whose measured peak RSS fits in {args.safety:g} x usable RAM"
    if args.round_budget is not None:
        rule += f" and whose {args.local_steps} local steps fit in {args.round_budget:g} s"
    return rule


def _tier(profile, manifest, host, args):
    return hp.tier_for(profile, manifest, round_budget_s=args.round_budget, local_steps=args.local_steps,
                       safety=args.safety, host_core_gflops=host, threads=args.threads)


def profile_table(selected, manifest, manifest_note, host, host_note, args) -> str:
    headers = ("profile", "cores x GHz", "RAM MB", "usable MB", "core GFLOPS", "up/down Mbps", "latency ms",
               "avail", "tier", "step s")
    rows = []
    for p in selected:
        tier, step = "export first", "-"
        if manifest is not None:
            name, _ = _tier(p, manifest, host, args)
            tier = name or "none"
            if name and host is not None and {"step_ms", "threads"} <= set(manifest.tiers[name].measured):
                step = f"{hp.emulated_step_seconds(p, manifest.tiers[name], host, args.threads):.2f}"
        rows.append((p.name, f"{p.cpu_cores} x {_num(p.cpu_ghz)}", p.ram_mb, p.usable_ram_mb, _num(p.core_gflops),
                     f"{p.uplink_mbps:g}/{p.downlink_mbps:g}", f"{p.latency_ms:g}", f"{p.availability:.2f}",
                     tier, step))
    lines = [format_table(headers, rows), "", host_note]
    if manifest is None:
        lines.append(f"tier: {manifest_note}")
    else:
        lines.append(f"tier: {_rule(args)} ({args.artifacts}); step s: emulated seconds per training step of that "
                     "tier on the device's cores")
    lines.append("`fftmoe profiles show NAME` prints a profile's sources and why it gets its tier.")
    return "\n".join(lines)


def show_profile(p, manifest, manifest_note, host, host_note, args) -> str:
    header, sources = citations(p)
    lines = [f"{p.name}: {p.description}", f"file: {p.source}"]
    lines += [f"  {note}" for note in header]
    lines.append("")
    for key in hp.KEYS:
        if key in ("name", "description"):
            continue
        value = getattr(p, key)
        lines.append(f"  {key:<15} {_num(value)} {UNITS.get(key, '')}".rstrip() if isinstance(value, float)
                     else f"  {key:<15} {value}")
        lines += [f"  {'':<15}   {text}" for text in sources.get(key, [])]
    lines += ["", f"usable RAM {p.usable_ram_mb} MB; {p.total_gflops:g} GFLOPS over {p.cpu_cores} cores", host_note]
    if manifest is None:
        lines.append(f"tier: export first: {manifest_note}")
    else:
        name, reasons = _tier(p, manifest, host, args)
        lines.append(f"tier: {name or 'none fits'} ({_rule(args)}, from {args.artifacts})")
        lines += [f"  {r}" for r in reasons]
    return "\n".join(lines)


def _num(x: float) -> str:
    """At least one decimal, at most two: 1.0, 1.43, 25.0."""
    text = f"{x:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def citations(profile: hp.Profile) -> tuple[list[str], dict[str, list[str]]]:
    """The comments of a profile's TOML file: (file header notes, {key: comments above it and on its line})."""
    header: list[str] = []
    by_key: dict[str, list[str]] = {}
    pending: list[str] = []
    seen_key = False
    for raw in Path(profile.source).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            pending.append(line.lstrip("#").strip())
        elif not line:  # a blank line ends a comment block; before the first key it is the file's header
            header += [] if seen_key else pending
            pending = []
        elif "=" in line:
            key, _, rest = line.partition("=")
            rest = rest.strip()
            value_end = rest.find('"', 1) + 1 if rest.startswith('"') else 0  # a '#' inside a string is not a comment
            inline = rest[value_end:].partition("#")[2].strip()
            by_key[key.strip()] = pending + ([inline] if inline else [])
            pending, seen_key = [], True
    return header, by_key


if __name__ == "__main__":
    sys.exit(main())
