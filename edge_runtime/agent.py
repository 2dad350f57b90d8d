"""The device agent: announce, receive round tasks, train locally, upload, repeat; unattended.

`DeviceAgent.run()` connects through `mqtt.MqttConnection` (which reconnects by itself), announces
the device with a Hello on its presence topic (a retained offline Presence is its last will),
and serves RoundTasks one at a time in the main thread while the network thread keeps the
connection alive. A task it cannot serve gets an ErrorReply with a code, never a crash. Uploads
are re-published whole until the broker acknowledges every chunk; the server drops duplicates by
(device, round), so an update counts exactly once even across a broker restart. SIGTERM finishes
the current training step and exits cleanly. It is not the trainer (`trainer.py`).

Exit codes: 0 stopped cleanly; 2 bad configuration; 3 artifacts missing or corrupt;
4 local data unusable; 5 state file corrupt.
"""

from __future__ import annotations

import functools
import logging
import platform
import queue
import signal
import threading
import time

import numpy as np

from edge_runtime import wire
from edge_runtime.device_config import DeviceConfig
from edge_runtime.emulation import Emulation, cpu_turn, peak_resident_mb, sleep_transfer
from edge_runtime.label_privacy import reported_counts
from edge_runtime.local_state import DeviceState, LocalState
from edge_runtime.mqtt import BrokerConfig, MqttConnection
from edge_runtime.trainer import LossInputs, TierTrainer, TrainerError, label_log_prior, take_steps

log = logging.getLogger("fftmoe.device")

EXIT_OK, EXIT_CONFIG, EXIT_ARTIFACTS, EXIT_DATA, EXIT_STATE = 0, 2, 3, 4, 5


class DeviceAgent:
    """One device: a trainer, its local data, its state folder and a broker connection."""

    def __init__(self, config: DeviceConfig, trainer: TierTrainer, dataset, state: LocalState,
                 broker: BrokerConfig, emulation: Emulation | None = None):
        self.config = config
        self.emulation = emulation
        self._dropped_round: int | None = None  # emulated dropout: silent until this round closes
        self._bytes_in: dict[str, int] = {}
        self.trainer = trainer
        self.dataset = dataset
        self.state = state
        self.saved = state.load() or DeviceState(device_id=config.device_id, tier=config.tier)
        if config.label_count_epsilon is not None:
            self.reported_label_counts  # noqa: B018 -- a corrupt release file stops the device now, not mid-round
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._reassembler = wire.Reassembler()
        self._last_upload: wire.Update | None = None  # answered again when its task is repeated
        self._lane: tuple[int, str | None] = (-1, None)  # (round, aggregator worker its task named)
        self._uploaded_at = 0.0  # monotonic time the last upload was acknowledged
        self._rng = np.random.default_rng(config.seed)
        self._dropout_rng = np.random.default_rng([config.seed, 1])  # separate: dropouts do not shift batches
        fed, dev = config.federation, config.device_id
        offline = wire.encode(wire.Presence(device_id=dev, online=False, timestamp=0.0))[0]
        self._presence_topic = wire.presence_topic(fed, dev)
        self.connection = MqttConnection(
            broker, client_id=f"fftmoe-{fed}-{dev}",
            subscriptions=[(wire.task_topic(fed, dev), wire.QOS_TASK), (wire.global_topic(fed), wire.QOS_GLOBAL)],
            on_message=self._receive, will=(self._presence_topic, offline, wire.QOS_PRESENCE, True),
            on_connect=self._announce)

    # -- network thread side -------------------------------------------------------------------
    def _receive(self, topic: str, payload: bytes) -> None:
        self._bytes_in[topic] = self._bytes_in.get(topic, 0) + len(payload)
        try:
            message = self._reassembler.add(payload, source=topic)
        except wire.WireError as err:
            log.warning("dropped a bad message on %s: %s", topic, err)
            if isinstance(err, (wire.ChecksumError, wire.SchemaVersionError)):
                code = wire.ErrorCode.BAD_HASH if isinstance(err, wire.ChecksumError) else wire.ErrorCode.SCHEMA_VERSION
                self._inbox.put(("error", code, str(err)))
            return
        if message is not None:
            self._inbox.put(("message", message, self._bytes_in.pop(topic, 0), time.monotonic()))

    def _announce(self) -> None:
        hello = wire.Hello(device_id=self.config.device_id, profile=self.config.profile, tier=self.config.tier,
                           last_round_seen=self.saved.last_round_seen,
                           runtime={"python": platform.python_version(), "machine": platform.machine()})
        online = wire.Presence(device_id=self.config.device_id, online=True, timestamp=time.time())
        self.connection.publish(self._presence_topic, wire.encode(online)[0], wire.QOS_PRESENCE, retain=True)
        self.connection.publish_chunks(self._presence_topic, wire.encode(hello), wire.QOS_PRESENCE)

    # -- main thread ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, max_rounds: int | None = None) -> int:
        """Serve rounds until stopped (or `max_rounds` tasks were served); returns an exit code."""
        served = 0
        self.connection.start()
        log.info("device %s (tier %s, %d training / %d held-out samples) joining federation %s at %s:%s",
                 self.config.device_id, self.config.tier, self.dataset.train_size, self.dataset.holdout_size,
                 self.config.federation, self.connection.config.host, self.connection.config.port)
        try:
            while not self._stop.is_set() and (max_rounds is None or served < max_rounds):
                try:
                    item = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item[0] == "error":
                    self._reply_error(None, item[1], item[2])
                    continue
                message, nbytes, arrived = item[1], item[2], item[3]
                if isinstance(message, wire.RoundTask):
                    try:
                        served += self._serve(message, nbytes, arrived)
                    except Exception as err:  # noqa: BLE001 - a task must never kill an unattended device
                        log.exception("round %d: internal error", message.round)
                        self._reply_error(message.round, wire.ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")
                elif isinstance(message, wire.GlobalState):
                    log.debug("global state for round %d", message.round)
                    if message.note == wire.ROLL_CALL:  # the server restarted and lost its registry
                        self._announce()
                    elif self._dropped_round is not None and message.round >= self._dropped_round:
                        log.info("emulated dropout over: back online after round %d", self._dropped_round)
                        self._dropped_round = None
                        self._announce()
        finally:
            offline = wire.encode(wire.Presence(device_id=self.config.device_id, online=False, timestamp=time.time()))
            self.connection.stop(final=(self._presence_topic, offline[0], wire.QOS_PRESENCE, True))
        return EXIT_OK

    def _reply_error(self, round_: int | None, code: wire.ErrorCode, text: str) -> None:
        reply = wire.ErrorReply(device_id=self.config.device_id, round=round_, code=code, message=text[:2000])
        self.connection.publish_chunks(self._upload_topic(round_), wire.encode(reply), wire.QOS_UPLOAD)

    def _upload_topic(self, round_: int | None) -> str:
        """The round's upload topic, on the lane of the aggregator worker its latest task named."""
        lane = self._lane[1] if round_ is not None and self._lane[0] == round_ else None
        return wire.upload_topic(self.config.federation, self.config.device_id, round_, lane)

    def _serve(self, task: wire.RoundTask, nbytes: int = 0, arrived: float = 0.0) -> bool:
        cfg = self.config
        if task.device_id != cfg.device_id or task.federation != cfg.federation:
            return False
        if self._dropped_round == task.round:
            return False  # emulated dropout: this device is "offline" for the round
        self._lane = (task.round, task.upload_lane or None)  # a repeated task may name another worker
        fresh = self._last_upload is None or self._last_upload.round != task.round
        if self.emulation is not None and fresh:
            if self.emulation.drops_out(self._dropout_rng):
                log.info("round %d: emulated dropout (availability %.2f): offline for this round", task.round,
                         self.emulation.availability)
                self._dropped_round = task.round
                offline = wire.Presence(device_id=cfg.device_id, online=False, timestamp=time.time())
                self.connection.publish(self._presence_topic, wire.encode(offline)[0], wire.QOS_PRESENCE, retain=True)
                return False
        if self._last_upload is not None and self._last_upload.round == task.round:
            if arrived < self._uploaded_at:
                return False  # a repeat sent while we were still training: the upload answered it
            log.info("round %d: task repeated; re-sending the update already trained", task.round)
            self._upload(task.round, self._encode(self._last_upload, task.upload_dtype))
            return False
        if task.tier != cfg.tier:
            self._reply_error(task.round, wire.ErrorCode.UNKNOWN_TIER,
                              f"this device runs tier {cfg.tier!r}, the task is for {task.tier!r}")
            return False
        try:
            arrays, target = self._task_inputs(task)
        except TrainerError as err:
            self._reply_error(task.round, wire.ErrorCode.BAD_TASK, str(err))
            return False
        log.info("round %d: training %d local steps (lr %.2g, lambda_bal %.3g, lambda_het %.3g, logit prior %.3g)",
                 task.round, task.local_steps, task.learning_rate, task.lambda_bal, task.lambda_het, task.logit_prior)
        download_s = sleep_transfer(self.emulation, nbytes, upload=False)
        tier = self.trainer.tier
        batches = take_steps(lambda: self.dataset.batches(tier.batch_size, self._rng), task.local_steps)
        started = time.perf_counter()

        def progress(step: int, loss: float) -> None:
            if step % cfg.log_every == 0 or step == task.local_steps:
                rate = step * tier.batch_size / max(time.perf_counter() - started, 1e-9)
                log.info("round %d: step %d/%d loss %.4f (%.1f samples/s)", task.round, step, task.local_steps,
                         loss, rate)

        try:
            with cpu_turn(self.emulation, self.trainer.threads, self._stop.is_set) as waited:
                if waited < 0:
                    log.info("round %d: stopping while waiting for a host core", task.round)
                    return False
                counts = self.train_label_counts
                loss = LossInputs(task.lambda_bal, task.lambda_het, target, label_log_prior(counts, task.logit_prior),
                                  kept_labels=counts == 0 if task.own_labels_only else None)
                result = self.trainer.train_round(arrays, batches, loss,
                                                  task.learning_rate, reset_optimizer=cfg.reset_optimizer,
                                                  on_step=progress, should_stop=self._stop.is_set)
        except (TrainerError, RuntimeError) as err:
            log.error("round %d: training failed: %s", task.round, err)
            self._reply_error(task.round, wire.ErrorCode.TRAINING_FAILED, str(err))
            return False
        if result.metrics.get("stopped"):
            log.info("round %d: stopping; the partial round is abandoned", task.round)
            return False
        holdout_loss, holdout_acc, holdout_n = self.trainer.evaluate(self.dataset.holdout_batches(tier.batch_size))
        layers = [str(layer) for layer in tier.adapted_layers] if tier.experts_held else []  # LoRA: no tokens
        metrics = {"loss": result.loss, "accuracy": result.accuracy, "train_seconds": result.train_seconds,
                   "cpu_seconds": result.cpu_seconds, "steps": float(result.steps),
                   "samples_seen": float(result.num_samples)}
        metrics.update(self._emulated_times(result, download_s, task.upload_dtype))
        metrics["peak_rss_mb"] = peak_resident_mb()
        if task.report_label_counts and cfg.label_count_epsilon is not None:
            metrics["label_count_epsilon"] = cfg.label_count_epsilon
        if holdout_n:
            metrics.update(holdout_loss=holdout_loss, holdout_accuracy=holdout_acc, holdout_samples=float(holdout_n))
        update = wire.Update(device_id=cfg.device_id, round=task.round, tier=tier.name, params=result.params,
                             expert_tokens={layer: [int(round(x)) for x in result.expert_tokens[i]]
                                            for i, layer in enumerate(layers)},
                             num_samples=self.dataset.train_size, metrics=metrics,
                             label_counts=self.reported_label_counts if task.report_label_counts else [])
        encode_start = time.perf_counter()
        try:
            chunks = self._encode(update, task.upload_dtype)
        except wire.PayloadTooLarge as err:
            log.error("round %d: update not sent: %s (raise max_message_bytes in the device config if the "
                      "broker allows larger messages)", task.round, err)
            self._reply_error(task.round, wire.ErrorCode.INTERNAL, f"update too large: {err}")
            return False
        encode_s = time.perf_counter() - encode_start
        self._last_upload = update
        sleep_transfer(self.emulation, sum(map(len, chunks)), upload=True)
        publish_start = time.perf_counter()
        self._upload(task.round, chunks)
        publish_s = time.perf_counter() - publish_start
        log.info("round %d: uploaded %d bytes in %d chunks (encode %.3f s, publish %.3f s, training %.2f s); "
                 "train loss %.4f acc %.3f%s", task.round, sum(map(len, chunks)), len(chunks), encode_s, publish_s,
                 result.train_seconds, result.loss, result.accuracy,
                 f", held-out acc {holdout_acc:.3f}" if holdout_n else "")
        self.saved = DeviceState(device_id=cfg.device_id, tier=cfg.tier, last_round_seen=task.round,
                                 rounds_completed=self.saved.rounds_completed + 1)
        if cfg.personal_router:
            self._save_personal_router(result.params, task.slot_map)
        self.state.save(self.saved)
        return True

    @functools.cached_property
    def train_label_counts(self) -> np.ndarray:
        """Training samples per manifest label [C]; the local data does not change while the agent runs."""
        return np.array(list(self.dataset.label_counts("train").values()))

    @functools.cached_property
    def reported_label_counts(self) -> list[int]:
        """What a task asking for label counts gets: the exact counts, or the device's one private
        release of them (`label_privacy`)."""
        return reported_counts(self.train_label_counts, self.config.label_count_epsilon, self.state.folder)

    def _emulated_times(self, result, download_s: float, upload_dtype: str) -> dict[str, float]:
        """Emulated compute and transfer seconds of this round (wall time without emulation)."""
        if self.emulation is None:
            return {"emulated_compute_s": result.train_seconds, "emulated_transfer_s": 0.0,
                    "emulated_s": result.train_seconds}
        itemsize = 2 if upload_dtype == "float16" else 4
        upload_bytes = sum(a.size * itemsize for a in result.params.values())
        compute = self.emulation.compute_seconds(result.cpu_seconds, self.emulation.cpu_cores)  # the device's cores
        transfer = download_s + self.emulation.transfer_seconds(upload_bytes, upload=True)
        return {"emulated_compute_s": compute, "emulated_transfer_s": transfer, "emulated_s": compute + transfer}

    def _encode(self, update: wire.Update, dtype: str) -> list[bytes]:
        """Chunks with a fresh message id: a re-sent update is a new message to the receiver's
        transport dedup; the server counts it once per (device, round)."""
        return wire.encode(update, chunk_size=self.config.chunk_size, dtype=dtype,
                           max_message_bytes=self.config.max_message_bytes)

    def _upload(self, round_: int, chunks: list[bytes]) -> None:
        """Publish until the broker acknowledged every chunk (across reconnects), or we are stopped."""
        topic = self._upload_topic(round_)
        while not self._stop.is_set():
            if self.connection.wait_connected(timeout=1.0) and self.connection.publish_chunks(topic, chunks,
                                                                                               wire.QOS_UPLOAD):
                self._uploaded_at = time.monotonic()
                return
            log.warning("round %d: upload interrupted; re-sending when the broker is back", round_)

    def _task_inputs(self, task: wire.RoundTask) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Global arrays and the q target [L_t, M_t] from a task, checked against this tier."""
        tier = self.trainer.tier
        expected = self.trainer.param_shapes
        if set(task.params) != set(expected):
            missing, extra = sorted(set(expected) - set(task.params)), sorted(set(task.params) - set(expected))
            raise TrainerError(f"task arrays do not match tier {tier.name!r}: missing {missing[:3]}, extra {extra[:3]}")
        layers = [str(layer) for layer in tier.adapted_layers] if tier.experts_held else []  # LoRA: no slots
        if sorted(task.slot_map) != sorted(layers) or any(len(task.slot_map[k]) != tier.experts_held for k in layers):
            raise TrainerError(f"slot map {task.slot_map} does not fit tier {tier.name!r} "
                               f"(layers {layers}, {tier.experts_held} slots)")
        if task.het_target:
            target = np.array([task.het_target[layer] for layer in layers], dtype=np.float32)
        else:
            target = np.full((len(tier.adapted_layers), tier.experts_held), 1.0 / max(tier.experts_held, 1),
                             dtype=np.float32)
        arrays = {name: np.array(value, dtype=np.float32) for name, value in task.params.items()}
        if self.config.personal_router:
            self._apply_personal_router(arrays, task.slot_map)
        return arrays, target

    def _router_rows(self, slot_map: dict[str, list[int]]):
        """(array name, slot, key) of every router row this device holds: the key names the
        layer and the global expert, so a row follows its expert whichever slot it lands in."""
        for p in self.trainer.tier.params:
            if p.name.endswith(".router"):
                for slot, expert in enumerate(slot_map[str(p.layer)]):
                    yield p.name, slot, f"{p.layer}/{expert}"

    def _apply_personal_router(self, arrays: dict[str, np.ndarray], slot_map: dict[str, list[int]]) -> None:
        """Personalised routing: this device's own router rows replace the global ones it has."""
        saved = self.state.load_router()
        for name, slot, key in self._router_rows(slot_map):
            if key in saved:
                arrays[name][slot] = saved[key]

    def _save_personal_router(self, params: dict[str, np.ndarray], slot_map: dict[str, list[int]]) -> None:
        rows = self.state.load_router()
        rows.update({key: params[name][slot] for name, slot, key in self._router_rows(slot_map)})
        self.state.save_router(rows)


def install_signal_handlers(agent: DeviceAgent) -> None:
    """SIGTERM / SIGINT: finish the current step, abandon the round, say offline, exit 0."""
    def handler(signum, frame):
        log.info("signal %d: stopping after the current step", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
