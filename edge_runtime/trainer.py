"""The on-device trainer: one tier's ORT training artifacts, trained round by round on local data.

`TierTrainer` loads a tier (after checking every file against the manifest hashes), fills its expert
slots with the global arrays of a round, runs local AdamW steps with the FFT-MoE loss inputs, and
returns the trained arrays with per-slot token counts, loss and accuracy. A LoRA baseline's tier
(manifest method "lora") trains the same way with no slots, no loss inputs and no token counts. Optimiser state resets
between rounds by default (ORT 1.19.2 has no call to reset AdamW moments, so the module is rebuilt
from the checkpoint file, ~0.3 s). It knows nothing about MQTT (see `agent.py`) or files of data
(see `local_data.py`): batches come in as numpy arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime import _ort
from edge_runtime.manifest import Manifest, TierEntry, load_manifest, verify_tier

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids [B, T], attention_mask [B, T], labels [B]


class TrainerError(RuntimeError):
    """The trainer cannot use what it was given (arrays of the wrong name or shape, bad options)."""


# The head: training with a label prior shifts its bias (`LossInputs.logit_prior`); its rows of labels
# a device lacks may be kept as given (`LossInputs.kept_labels`).
HEAD_WEIGHT, HEAD_BIAS = "fftmoe_head.weight", "fftmoe_head.bias"


@dataclass(frozen=True)
class LossInputs:
    """The loss schedule of one round: weights, the heterogeneity target q [L_t, M_t] and the logit prior.

    logit_prior [C] (None: plain cross-entropy) is added to the logits while training: with
    tau * log p_local(y) the loss is the balanced softmax / logit adjustment of label-skewed data
    (docs/METHOD.md, "Loss"). The logits are `W x + b`, so adding it to the head's bias for the
    round's steps and taking it off the trained bias is the same gradient with no graph input.
    kept_labels [C]: head rows (weight and bias) reset to their start after the round, for labels the
    device has no samples of. AdamW normalises each coordinate's step, so even the tiny, one-signed
    gradient such a row gets moves it by the full learning rate every step, away from the device's
    features: a prior in the loss cannot stop that, only not updating the row does.
    """

    lambda_bal: float
    lambda_het: float
    het_target: np.ndarray  # [L_t, M_t], rows sum to 1
    logit_prior: np.ndarray | None = None  # [C]
    kept_labels: np.ndarray | None = None  # [C] bool: the head rows of these labels come back as given


def label_log_prior(counts, tau: float) -> np.ndarray | None:
    """tau * log p(y) [C] from a device's label counts, Laplace-smoothed ((n_c + 1) / (n + C)) so a
    label the device lacks gets a large negative prior, not -inf; None when tau is 0."""
    if tau == 0:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    return (tau * np.log((counts + 1.0) / (counts.sum() + len(counts)))).astype(np.float32)


@dataclass
class RoundResult:
    params: dict[str, np.ndarray]  # trained arrays, copies, tier shapes
    expert_tokens: np.ndarray  # [L_t, M_t] token selections per slot over the round
    num_samples: int  # samples seen in this round's steps
    steps: int
    loss: float  # mean training loss over the round's steps
    accuracy: float  # training accuracy over the round's steps
    train_seconds: float  # wall time of the steps
    cpu_seconds: float  # process CPU time of the steps (emulation scales this)
    metrics: dict[str, float] = field(default_factory=dict)


class TierTrainer:
    """Trains one tier's artifacts. Not thread-safe: one round at a time."""

    def __init__(self, artifacts: str | Path, tier: str, threads: int = 2, verify: bool = True,
                 spinning: bool = True):
        self.manifest: Manifest = load_manifest(artifacts)
        self.tier: TierEntry = verify_tier(self.manifest, tier) if verify else self.manifest.tier(tier)
        self.folder = self.manifest.root / self.tier.name
        self.threads = threads
        self.spinning = spinning
        self._shapes = {p.name: p.shape for p in self.tier.params}
        self._routed = not self.manifest.is_lora  # FFT-MoE graphs take the loss inputs and count tokens
        self._load()

    def _load(self) -> None:
        """(Re)build state, module and optimizer from the tier's files: fresh AdamW moments."""
        self._module = self._optimizer = self._state = None  # free the old session first
        _ort.release_memory()
        self._state = _ort.CheckpointState.load_checkpoint(str(self.folder / "checkpoint"))
        self._module = _ort.Module(str(self.folder / "training_model.onnx"), self._state,
                                   str(self.folder / "eval_model.onnx"),
                                   session_options=_ort.session_options(self.threads, self.spinning))
        self._optimizer = _ort.Optimizer(str(self.folder / "optimizer_model.onnx"), self._module)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def set_params(self, arrays: dict[str, np.ndarray]) -> None:
        """Write trainable arrays (any subset of the tier's names) into the model."""
        for name, value in arrays.items():
            if name not in self._shapes:
                raise TrainerError(f"tier {self.tier.name!r} has no trainable array {name!r}")
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != self._shapes[name]:
                raise TrainerError(f"{name}: shape {value.shape} but tier {self.tier.name!r} expects "
                                   f"{self._shapes[name]}")
            self._state.parameters[name] = value

    def get_params(self) -> dict[str, np.ndarray]:
        """Copies of the trainable arrays (ORT's `.data` is a live view of its memory)."""
        return {name: self._state.parameters[name].data.copy() for name in self._shapes}

    def train_round(self, global_arrays: dict[str, np.ndarray], batches: Iterable[Batch], loss: LossInputs,
                    learning_rate: float, reset_optimizer: bool = True,
                    on_step: Callable[[int, float], None] | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> RoundResult:
        """Train on `batches` starting from `global_arrays`; returns the trained arrays and statistics.

        `should_stop` is checked between steps, so a SIGTERM finishes the current step and returns
        what was done (with `metrics["stopped"] = 1`), never a half-applied step.
        """
        target = np.ascontiguousarray(loss.het_target, dtype=np.float32)
        want = (len(self.tier.adapted_layers), self.tier.experts_held)
        if target.shape != want:
            raise TrainerError(f"het_target shape {target.shape}, expected {want} for tier {self.tier.name!r}")
        prior, kept = self._logit_prior(loss.logit_prior), self._kept_labels(loss.kept_labels)
        if reset_optimizer:
            self._load()
        self.set_params(global_arrays)
        if prior is not None:  # train with the prior in the logits (LossInputs), on the bias as given
            self._state.parameters[HEAD_BIAS] = self._state.parameters[HEAD_BIAS].data + prior
        self._optimizer.set_learning_rate(float(learning_rate))
        lambdas = (np.array(loss.lambda_bal, np.float32), np.array(loss.lambda_het, np.float32))
        tokens = np.zeros(want, dtype=np.float64)
        losses, correct, seen, steps, stopped = [], 0, 0, 0, False
        self._module.train()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for input_ids, mask, labels in batches:
            if should_stop():
                stopped = True
                break
            step_loss, logits, *step_tokens = self._module(*self._feeds(input_ids, mask, labels, *lambdas, target))
            self._optimizer.step()
            self._module.lazy_reset_grad()
            steps += 1
            losses.append(float(step_loss))
            if step_tokens:
                tokens += step_tokens[0]
            correct += int((logits.argmax(axis=1) == labels).sum())
            seen += len(labels)
            if on_step is not None:
                on_step(steps, float(step_loss))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if steps == 0 and not stopped:
            raise TrainerError("no training batches: the local training split is empty")
        for value in losses:
            if not np.isfinite(value):
                raise TrainerError("training diverged: the loss became NaN or infinite; lower the learning rate")
        params = self.get_params()
        if prior is not None:  # the update carries the bias without the prior; the module keeps it (evaluate)
            params[HEAD_BIAS] = params[HEAD_BIAS] - prior
        if kept is not None:
            for name in (HEAD_WEIGHT, HEAD_BIAS):
                params[name][kept] = np.asarray(global_arrays[name], dtype=np.float32)[kept]
        return RoundResult(params=params, expert_tokens=tokens.astype(np.float32), num_samples=seen,
                           steps=steps, loss=float(np.mean(losses)) if losses else float("nan"),
                           accuracy=correct / seen if seen else 0.0, train_seconds=wall, cpu_seconds=cpu,
                           metrics={"stopped": float(stopped)})

    def _logit_prior(self, prior: np.ndarray | None) -> np.ndarray | None:
        if prior is None:
            return None
        prior = np.asarray(prior, dtype=np.float32)
        shape = self._shapes.get(HEAD_BIAS)
        if shape is None or prior.shape != shape or not np.isfinite(prior).all():
            raise TrainerError(f"logit_prior must be {shape} finite values (one per label), got shape {prior.shape}")
        return prior

    def _kept_labels(self, kept: np.ndarray | None) -> np.ndarray | None:
        if kept is None or not np.any(kept):
            return None
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != self._shapes.get(HEAD_BIAS) or HEAD_WEIGHT not in self._shapes:
            raise TrainerError(f"kept_labels must be one flag per label {self._shapes.get(HEAD_BIAS)}, "
                               f"got shape {kept.shape}")
        return kept

    def _feeds(self, input_ids, mask, labels, lambda_bal, lambda_het, target) -> tuple[np.ndarray, ...]:
        """The graph's inputs in order: a LoRA baseline's graph takes only the batch."""
        if self._routed:
            return input_ids, mask, labels, lambda_bal, lambda_het, target
        return input_ids, mask, labels

    def evaluate(self, batches: Iterable[Batch]) -> tuple[float, float, int]:
        """(mean loss, accuracy, samples) of the current arrays on held-out batches."""
        layers, held = len(self.tier.adapted_layers), self.tier.experts_held
        target = np.full((layers, held), 1.0 / max(held, 1), dtype=np.float32)
        zero = np.array(0.0, np.float32)
        self._module.eval()
        total_loss, correct, seen = 0.0, 0, 0
        for input_ids, mask, labels in batches:
            step_loss, logits, *_ = self._module(*self._feeds(input_ids, mask, labels, zero, zero, target))
            total_loss += float(step_loss) * len(labels)
            correct += int((logits.argmax(axis=1) == labels).sum())
            seen += len(labels)
        self._module.train()
        if seen == 0:
            return float("nan"), float("nan"), 0
        return total_loss / seen, correct / seen, seen


def export_inference_model(trainer: TierTrainer, path: str | Path) -> None:
    """A plain-onnxruntime model (ids, mask -> logits) with the trainer's current arrays baked in."""
    trainer._module.export_model_for_inferencing(str(path), list(trainer.manifest.infer_outputs))


def take_steps(epochs: Callable[[], Iterator[Batch]], steps: int) -> Iterator[Batch]:
    """Exactly `steps` batches, cycling through fresh epochs (reshuffled by the caller) as needed."""
    produced = 0
    while produced < steps:
        empty = True
        for batch in epochs():
            empty = False
            yield batch
            produced += 1
            if produced == steps:
                return
        if empty:
            return
