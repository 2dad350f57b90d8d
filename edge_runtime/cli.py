"""`fftmoe device`: the on-device command line. Imports only the torch-free edge runtime.

Subcommands:
  probe   verify a tier's artifacts against the manifest and measure its training step here
          (peak RSS, step time), the numbers that decide which tier a device can run.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fftmoe device", description="On-device commands (torch-free).")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="verify a tier's artifacts and measure one training step on this device")
    probe.add_argument("--artifacts", required=True, help="export folder (with manifest.json)")
    probe.add_argument("--tier", required=True, help="tier name from the manifest")
    probe.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    probe.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_runtime.manifest import ArtifactIntegrityError, ManifestError, load_manifest, verify_tier

    try:
        manifest = load_manifest(args.artifacts)
        tier = verify_tier(manifest, args.tier)
    except (ManifestError, ArtifactIntegrityError) as err:
        print(f"fftmoe device: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from edge_runtime import step_probe

    tier_dir = manifest.root / tier.name
    return step_probe.main([str(tier_dir), "--batch", str(tier.batch_size), "--seq", str(tier.seq_len),
                            "--vocab", str(manifest.backbone["vocab_size"]),
                            "--het-shape", f"{len(tier.adapted_layers)},{tier.experts_held}",
                            "--labels", str(len(manifest.labels)), "--threads", str(args.threads),
                            "--steps", str(args.steps)])


if __name__ == "__main__":
    sys.exit(main())
