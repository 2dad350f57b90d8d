"""The one place that imports ONNX Runtime's training API, without pulling in torch.

`import onnxruntime.training.api` runs `onnxruntime/training/__init__.py`, which imports `optim`
and through it torch (measured with onnxruntime-training-cpu 1.19.2). The `api` subpackage itself
needs no torch. So before importing it we register a bare module object for
`onnxruntime.training` whose `__path__` points at the installed folder: Python then resolves
`onnxruntime.training.api` from that folder without executing the package `__init__`.

If the real `onnxruntime.training` package is already imported (the export side, where torch is
present), it is used as is. Everything else in the project gets ORT objects from here.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class TrainingRuntimeMissing(ImportError):
    """The installed onnxruntime has no training API (plain `onnxruntime` instead of the training wheel)."""


def _load_training_api():
    if "onnxruntime.training" not in sys.modules:
        ort_spec = importlib.util.find_spec("onnxruntime")
        if ort_spec is None or not ort_spec.submodule_search_locations:
            raise TrainingRuntimeMissing(
                "onnxruntime is not installed; install the training wheel: pip install 'fftmoe[edge]'")
        ort_dir = list(ort_spec.submodule_search_locations)[0]
        shim = types.ModuleType("onnxruntime.training")
        shim.__path__ = [f"{ort_dir}/training"]
        shim.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = shim
        # onnxruntime's import-time build validation tries `onnxruntime.training.ortmodule`, which
        # imports torch when it is installed (an emulated device on a workstation): ~250 MB of RSS
        # a real device never has. A None entry makes that import fail fast; the validation
        # expects and handles the ImportError. Devices never use ORTModule.
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    try:
        from onnxruntime.training import api  # noqa: PLC0415
    except ImportError as err:
        raise TrainingRuntimeMissing(
            f"onnxruntime has no training API ({err}); install onnxruntime-training-cpu==1.19.2, "
            "not plain onnxruntime (see README: aarch64 devices need the source-built wheel)") from err
    return api


training_api = _load_training_api()

import onnxruntime  # noqa: E402  (after the shim, so this is the same installed package)

# ORT logs a warning per unused constant it prunes when a training session loads (dozens per
# model); only errors are worth a device owner's attention.
onnxruntime.set_default_logger_severity(3)

CheckpointState = training_api.CheckpointState
Module = training_api.Module
Optimizer = training_api.Optimizer
InferenceSession = onnxruntime.InferenceSession
SessionOptions = onnxruntime.SessionOptions
OrtValue = onnxruntime.OrtValue


def session_options(threads: int, spinning: bool = True) -> "onnxruntime.SessionOptions":
    """Session options with intra-op threads fixed (one inter-op thread: the graph is sequential).

    `spinning=False` stops idle worker threads from busy-waiting: slightly slower steps, but the
    process's CPU time then measures work done, which emulated time is computed from.
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def release_memory() -> None:
    """Hand memory that ORT freed back to the OS (glibc keeps freed arenas mapped otherwise).

    Rebuilding the training session each round (to reset AdamW) would otherwise grow the resident
    size by one session per round on glibc systems, which is what a memory-capped device sees.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
