"""The export pipeline: one ONNX Runtime training artifact set per budget tier, plus the manifest.

For each tier: wrap a copy of the frozen encoder with that tier's adapters, fill the slots from
the global initial arrays, trace to ONNX, apply the graph fix-ups, lint the gradient path, generate
training / eval / optimizer models and the checkpoint, lower IR versions, derive a plain inference
model, copy the tokenizer, and measure one training step in a torch-free subprocess. Then write
`global_init.npz` and `manifest.json` (last, atomically, so a folder with a manifest is complete).

Layout choice (measured, ORT_NOTES.md): the frozen backbone lives in each tier's checkpoint as
frozen parameters. A device installs exactly one tier folder, so the backbone exists once per
device and never travels in a round; it gave the lowest torch-free peak RSS of the layouts tried.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.local_state import atomic_write_bytes
from edge_runtime.manifest import (GLOBAL_INIT_NAME, MANIFEST_NAME, MANIFEST_SCHEMA, FileEntry, Manifest,
                                   ParamEntry, TierEntry, file_entry, layer_of)
from export.backbone import Backbone, ffn_output_modules
from export.graph_fixups import fix_forward_graph, lower_ir_version
from export.model import (INFER_INPUTS, INFER_OUTPUTS, METHODS, AdaptedClassifier, LoraClassifier,
                          initial_global_value)
from export.moe_adapter import is_adapter_param
from export.onnx_export import export_training_onnx
from export.op_lint import check_gradients
from export.tiers import Tier, TierSpec

TIER_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
              "inference_model.onnx", "tokenizer.json")


class ExportError(RuntimeError):
    """The export cannot proceed; the message says what and where."""


@dataclass
class ExportOptions:
    out_dir: Path
    labels: tuple[str, ...]
    seed: int = 0
    probe_threads: int = 2
    probe_steps: int = 5  # timed training steps in the torch-free probe (after one warm-up)
    method: str = "fft-moe"  # "fft-moe", or "lora" for the LoRA baselines (METHOD.md "Baselines")
    lora_rank: int | None = None  # one LoRA rank for every tier (FedIT) instead of each tier's lora_rank

    def tier_lora_rank(self, tier: Tier) -> int:
        return self.lora_rank or tier.lora_rank


Progress = Callable[[str], None]


def check_output_dir(out_dir: Path) -> None:
    """Fail early with a clear message if the output folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ExportError(f"output folder {out_dir} is not writable: {err.strerror or err}") from err


def export_all(backbone: Backbone, spec: TierSpec, options: ExportOptions, progress: Progress = print) -> Manifest:
    """Run the whole export into `options.out_dir` and return the manifest written there."""
    num_layers = len(ffn_output_modules(backbone.model))
    spec.check_against(num_layers, backbone.max_positions)
    if options.method not in METHODS:
        raise ExportError(f"unknown adapter method {options.method!r}; choose one of {', '.join(METHODS)}")
    if len(options.labels) < 2 or len(set(options.labels)) != len(options.labels):
        raise ExportError(f"need at least two distinct class labels, got {list(options.labels)}")
    if options.method == "lora":
        spec = spec.without_serving_tier()
    out = options.out_dir
    check_output_dir(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted export must not look complete

    global_arrays: dict[str, np.ndarray] = {}
    tiers: dict[str, TierEntry] = {}
    model = None
    for index, tier in enumerate(spec.tiers, start=1):
        label = f"[{index}/{len(spec.tiers)} {tier.name}]"
        model = _tier_model(backbone, spec, tier, options)
        tiers[tier.name] = _export_tier(backbone, model, tier, options, global_arrays, label, progress)

    progress("writing global initial arrays and manifest")
    init_path = out / GLOBAL_INIT_NAME
    buffer = io.BytesIO()
    np.savez(buffer, **global_arrays)
    atomic_write_bytes(init_path, buffer.getvalue())
    global_params = tuple(
        ParamEntry(name=n, shape=tuple(a.shape), dtype=str(a.dtype), slot_axis=_slot_axis(n, options), layer=layer_of(n))
        for n, a in global_arrays.items())
    hidden = int(backbone.model.config.hidden_size)
    manifest = Manifest(
        schema=MANIFEST_SCHEMA,
        backbone={"id": backbone.model_id, "sha256": backbone.sha256, "hidden_size": hidden,
                  "vocab_size": int(backbone.model.config.vocab_size),
                  "num_layers": num_layers, "max_positions": backbone.max_positions},
        labels=tuple(options.labels), experts=spec.experts, rank=spec.rank, global_params=global_params,
        train_inputs=model.train_inputs, train_outputs=model.train_outputs, infer_inputs=INFER_INPUTS,
        infer_outputs=INFER_OUTPUTS, tiers=tiers, global_init=file_entry(out, init_path),
        versions=_tool_versions(), method=options.method, root=out)
    atomic_write_bytes(out / MANIFEST_NAME, manifest.to_json().encode())
    return manifest


def _slot_axis(name: str, options: ExportOptions) -> int | None:
    """0 for the per-expert stacks of FFT-MoE; None for the head and for LoRA factors (no slots)."""
    return None if name.startswith("fftmoe_head") or options.method == "lora" else 0


def _tier_model(backbone: Backbone, spec: TierSpec, tier: Tier,
                options: ExportOptions) -> AdaptedClassifier | LoraClassifier:
    """A copy of the frozen encoder with this tier's adapters and a fresh head."""
    encoder, labels = copy.deepcopy(backbone.model), len(options.labels)
    if options.method == "lora":
        r_max = max(options.tier_lora_rank(t) for t in spec.tiers)
        return LoraClassifier(encoder, labels, rank=options.tier_lora_rank(tier), adapted_layers=tier.adapted_layers,
                              global_rank=r_max)
    return AdaptedClassifier(encoder, labels, rank=spec.rank, experts=tier.experts_held, top_k=tier.top_k,
                             adapted_layers=tier.adapted_layers, global_experts=spec.experts)


def _export_tier(backbone: Backbone, model: AdaptedClassifier | LoraClassifier, tier: Tier, options: ExportOptions,
                 global_arrays: dict[str, np.ndarray], label: str, progress: Progress) -> TierEntry:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)  # importing ortmodule resets it to verbose
    tier_dir = options.out_dir / tier.name
    if tier_dir.exists():
        shutil.rmtree(tier_dir)
    tier_dir.mkdir(parents=True)
    started = time.perf_counter()

    trainable = model.adapter_parameters()
    for name in trainable:
        if name not in global_arrays:
            global_arrays[name] = initial_global_value(name, model.global_shape(name), options.seed)
    model.load_global(global_arrays)  # round 0's values; the server sends the real ones each round

    progress(f"{label} tracing PyTorch -> ONNX (seq {tier.seq_len}, batch {tier.batch_size})")
    forward_path = tier_dir / "forward.onnx"
    onnx_model = export_training_onnx(model, forward_path, batch=min(tier.batch_size, 2), seq_len=min(tier.seq_len, 16))
    forward_path.unlink()
    fix_forward_graph(onnx_model)
    names = [init.name for init in onnx_model.graph.initializer]
    requires_grad = [n for n in names if is_adapter_param(n)]
    missing = set(trainable) - set(requires_grad)
    if missing:
        raise ExportError(f"{label} adapter parameters lost in ONNX export: {sorted(missing)}")
    check_gradients(onnx_model, requires_grad, model.train_outputs[0])

    progress(f"{label} generating training artifacts ({len(requires_grad)} trainable arrays)")
    with _native_stderr_captured():
        artifacts.generate_artifacts(onnx_model, requires_grad=requires_grad,
                                     frozen_params=[n for n in names if not is_adapter_param(n)],
                                     loss=None, optimizer=artifacts.OptimType.AdamW, artifact_directory=tier_dir)
    del onnx_model
    for onnx_file in tier_dir.glob("*.onnx"):
        lower_ir_version(onnx_file)
    _write_inference_model(tier_dir)
    shutil.copyfile(backbone.tokenizer_json, tier_dir / "tokenizer.json")

    progress(f"{label} measuring one training step in a torch-free process")
    lora = options.method == "lora"
    measured = probe_tier(tier_dir, tier, layers=tier.adapted_layers, experts=0 if lora else tier.experts_held,
                          vocab=int(backbone.model.config.vocab_size),
                          threads=options.probe_threads, steps=options.probe_steps)
    params = tuple(ParamEntry(name=n, shape=tuple(p.shape), dtype="float32", slot_axis=_slot_axis(n, options),
                              layer=layer_of(n))
                   for n, p in trainable.items())
    files = {Path(f).stem: file_entry(options.out_dir, tier_dir / f) for f in TIER_FILES}
    progress(f"{label} done in {time.perf_counter() - started:.1f} s: peak RSS {measured['peak_rss_mb']:.0f} MB, "
             f"step {measured['step_ms']:.0f} ms")
    num_layers = len(ffn_output_modules(backbone.model))
    return TierEntry(name=tier.name, experts_held=0 if lora else tier.experts_held, top_k=0 if lora else tier.top_k,
                     adapted_layers=tuple(range(num_layers - tier.adapted_layers, num_layers)),
                     seq_len=tier.seq_len, batch_size=tier.batch_size, params=params, files=files,
                     measured=measured, description=tier.description,
                     rank=model.rank, serving_only=tier.serving_only)


def _write_inference_model(tier_dir: Path) -> None:
    """Plain-onnxruntime model (ids, mask -> logits) with the checkpoint's weights baked in."""
    from edge_runtime import _ort

    state = _ort.CheckpointState.load_checkpoint(str(tier_dir / "checkpoint"))
    module = _ort.Module(str(tier_dir / "training_model.onnx"), state, str(tier_dir / "eval_model.onnx"))
    module.export_model_for_inferencing(str(tier_dir / "inference_model.onnx"), list(INFER_OUTPUTS))
    lower_ir_version(tier_dir / "inference_model.onnx")


def probe_tier(tier_dir: Path, tier: Tier, layers: int, experts: int, vocab: int, threads: int,
               steps: int) -> dict[str, float]:
    """Run `edge_runtime.step_probe` in a fresh interpreter with torch imports forbidden (experts 0: LoRA)."""
    cmd = [sys.executable, "-m", "edge_runtime.step_probe", str(tier_dir), "--batch", str(tier.batch_size),
           "--seq", str(tier.seq_len), "--vocab", str(vocab), "--het-shape", f"{layers},{experts}",
           "--threads", str(threads), "--steps", str(steps), "--forbid-torch"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ExportError(f"torch-free training probe failed for tier {tier.name!r}:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _native_stderr_captured():
    """Hold back what native code writes to fd 2, and show it only if the block fails.

    ORT's gradient-graph builder logs every graph transformer at info level through a logger that
    `set_default_logger_severity` does not reach (hundreds of lines per tier).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("fftmoe", "torch", "transformers", "onnx", "onnxruntime-training-cpu", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


__all__ = ["ExportError", "ExportOptions", "FileEntry", "check_output_dir", "export_all", "probe_tier"]
