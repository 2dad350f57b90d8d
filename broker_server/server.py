"""The aggregation server: synchronous FFT-MoE rounds over MQTT, with durable state.

Per round: wait for enough online devices, sample participants, give each a slot map
(`slots.py`) and the global arrays of its slots, re-send open tasks until answered or the
deadline, validate every update and fold it into the streaming strategy as it arrives
(`aggregation.py`), then commit the new global state (`state.py`) and broadcast the usage.
A round with too few updates is retried with other devices. Late updates of a closed round are
logged and dropped; an update counts at most once per (device, round). The MQTT network thread
only reassembles and queues; all decisions happen on the main thread. No torch, no exporter.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker_server.aggregation import AggregationConfig, UpdateRejected
from broker_server import audit
from broker_server.config import ServerConfig
from broker_server.methods import make_method
from broker_server.receiver import UploadReceiver
from broker_server.state import ServerState, StateStore
from edge_runtime import wire
from edge_runtime.manifest import Manifest
from edge_runtime.mqtt import BrokerConfig, MqttConnection

log = logging.getLogger("fftmoe.server")
RESEND_SCAN_S = 0.2  # how often open tasks are checked for a due re-send (and the inbox polled when idle)


@dataclass
class Device:
    device_id: str
    tier: str
    profile: str
    online: bool = True
    last_seen: float = 0.0
    history: dict[int, np.ndarray] | None = None  # tokens per global expert, last round it trained


@dataclass
class OpenTask:
    message: wire.RoundTask
    slot_map: dict[int, list[int]]
    sent_at: float
    bytes_down: int
    answered: bool = False


@dataclass
class RoundOutcome:
    updates: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # device -> reason
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: list[dict] = field(default_factory=list)  # per accepted update
    devices: dict[str, dict] = field(default_factory=dict)  # per participant: status, times, bytes, usage


class AggregationServer:
    """Runs rounds until `config.rounds` are complete in the state folder (or `stop()`)."""

    QUORUM_LOG_EVERY_S = 30.0  # how often a round waiting for devices says so

    def __init__(self, config: ServerConfig, manifest: Manifest, store: StateStore, broker: BrokerConfig,
                 evaluate: Callable[[dict[str, np.ndarray]], dict] | None = None):
        """`evaluate(global_arrays) -> {name: value}` adds e.g. test accuracy to every round's record."""
        self.config = config
        self.evaluate = evaluate
        self.manifest = manifest
        self.store = store
        self.method = make_method(config.method, manifest, AggregationConfig(
            weighting=config.weighting, optimizer=config.optimizer, server_lr=config.server_lr,
            personalise_router=config.personalise_router, router_lr=config.router_lr,
            exact=config.exact or config.workers > 0, clip_multiplier=config.clip_multiplier,
            norm_policy=config.norm_policy), gamma=config.gamma, slot_keep=config.slot_keep)
        self.strategy, self.space = self.method.strategy, self.method.space
        self.state = self._initial_state()
        self.devices: dict[str, Device] = {}
        self.receiver = UploadReceiver(lambda: self.state.round,  # the MQTT network thread's part
                                       busy=lambda: self.connection.awaiting_acks)
        self.receiver.holding = False  # set while a round is collected
        self.inbox = self.receiver.inbox
        self._stop = threading.Event()
        self._folded = 0  # updates folded in the current round: their order in the audit log
        self._rng = random.Random(config.seed)
        # online devices a round waits for: config.min_devices, lowered by whoever knows a device is gone
        # for good (`fftmoe run` when an emulated device's process dies), so the run goes on without it
        self.min_devices = max(config.min_devices, 1)
        fed = config.federation
        self._ack = None  # acknowledges the message the main thread took last (MqttConnection backpressure)
        self.connection = MqttConnection(broker, client_id=f"fftmoe-server-{fed}", subscriptions=self._subscriptions(),
                                         on_message=self.receiver, on_connect=self._roll_call, manual_ack=True)

    def _subscriptions(self) -> list[tuple[str, int]]:
        fed = self.config.federation
        return [(wire.presence_subscription(fed), wire.QOS_PRESENCE), (wire.upload_subscription(fed), wire.QOS_UPLOAD)]

    def _roll_call(self) -> None:
        """Ask every device to announce itself: after a server restart the registry is empty while
        devices are still connected and would not send a Hello on their own."""
        message = wire.GlobalState(round=self.state.round, expert_usage=self.usage(), note=wire.ROLL_CALL)
        self.connection.publish_chunks(wire.global_topic(self.config.federation), wire.encode(message),
                                       wire.QOS_GLOBAL)

    def _initial_state(self) -> ServerState:
        state = self.store.load()
        sha = self.manifest.backbone["sha256"]
        if state is None:
            with np.load(self.manifest.root / self.manifest.global_init.path, allow_pickle=False) as data:
                arrays = self.method.initial_global({name: data[name] for name in data.files})
            return ServerState(round=0, global_arrays=arrays, backbone_sha256=sha)
        if state.backbone_sha256 != sha:
            raise ValueError(f"state folder {self.store.folder} belongs to another export (backbone "
                             f"{state.backbone_sha256[:12]}, artifacts {sha[:12]}); use a new --state-dir")
        self.method.load_state(state.optimizer, state.usage)
        log.info("resuming at round %d from %s", state.round, self.store.folder)
        return state

    # -- main thread ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """True once `run` has returned (or is returning)."""
        return self._stop.is_set()

    def usage(self) -> dict[str, list[float]]:
        """The fleet's expert usage EMA: layer -> share per global expert (empty for LoRA)."""
        return self.method.usage()

    def run(self) -> int:
        self.connection.start()
        if not self.connection.wait_connected(timeout=30):
            log.warning("broker %s:%s not reachable yet; still trying", self.connection.config.host,
                        self.connection.config.port)
        try:
            while not self._stop.is_set() and (self.config.rounds == 0 or self.state.round < self.config.rounds):
                self._run_round()
        finally:
            self._stop.set()
            self.connection.stop()
        return 0

    def _release(self) -> None:
        """Acknowledge the message `_drain` returned last: the caller is done with it. (A broker waits
        for the acknowledgement; amqtt gives up after a while and logs an error.)"""
        if self._ack is not None:
            self._ack()
            self._ack = None

    def _start_collecting(self) -> None:
        """Uploads (and worker partials) now wait for the main thread's acknowledgement: backpressure
        (broker_server/receiver.py)."""
        self.receiver.holding = True

    def _stop_collecting(self) -> None:
        """Until the next round, late messages are acknowledged on arrival, and the round's last one now:
        none may wait for finish and the evaluation (amqtt gives up on an acknowledgement after 5 s)."""
        self.receiver.holding = False
        self._release()

    def _drain(self, timeout: float) -> wire.Message | None:
        self._release()  # the caller is done with the previous message
        try:
            message, self._ack = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(message, wire.Hello):
            self._register(message)
        elif isinstance(message, wire.Presence):
            device = self.devices.get(message.device_id)
            if device is not None:
                device.online = message.online
                device.last_seen = time.time()
        return message

    def _register(self, hello: wire.Hello) -> None:
        if hello.tier not in self.manifest.training_tiers:
            log.warning("device %s announced %s; ignored (device tiers: %s)", hello.device_id,
                        self.manifest.not_a_device_tier(hello.tier), ", ".join(self.manifest.training_tiers))
            return
        known = self.devices.get(hello.device_id)
        if known is None:
            log.info("device %s joined (tier %s, profile %s, last round seen %s)", hello.device_id, hello.tier,
                     hello.profile, hello.last_round_seen)
            self.devices[hello.device_id] = Device(hello.device_id, hello.tier, hello.profile, last_seen=time.time())
        else:
            known.online, known.tier, known.last_seen = True, hello.tier, time.time()

    def _online(self) -> list[str]:
        return sorted(d.device_id for d in self.devices.values() if d.online)

    def _run_round(self) -> None:
        cfg = self.config
        round_ = self.state.round
        excluded: set[str] = set()
        for attempt in range(1, cfg.max_attempts + 1):
            self._wait_for_quorum(round_)
            if self._stop.is_set():
                return
            eligible = [d for d in self._online() if d not in excluded]
            if len(eligible) < self.min_devices:
                # too few besides those that failed this round: they try again (they are back online).
                # Waiting for fresh devices instead hung the round for good (tests/test_soak.py).
                eligible = self._online()
            count = min(len(eligible), max(cfg.min_participants, math.ceil(cfg.fraction * len(eligible))))
            participants = sorted(self._rng.sample(eligible, count))
            started = time.perf_counter()
            outcome = self._collect(round_, participants)
            if outcome is None:
                return  # stopped
            if outcome.updates >= cfg.min_updates:
                self._close(round_, participants, outcome, attempt, time.perf_counter() - started)
                return
            log.warning("round %d attempt %d: %d of %d updates (need %d); retrying with other devices", round_,
                        attempt, outcome.updates, len(participants), cfg.min_updates)
            excluded |= set(outcome.failed)  # those that answered re-send their cached update if re-sampled
        log.warning("round %d: no quorum after %d attempts; waiting for devices", round_, cfg.max_attempts)

    def _wait_for_quorum(self, round_: int) -> None:
        """Block until self.min_devices devices are online (or stop), saying so every QUORUM_LOG_EVERY_S."""
        log_every_s = self.QUORUM_LOG_EVERY_S
        next_log = time.monotonic() + log_every_s
        while not self._stop.is_set() and len(self._online()) < self.min_devices:
            self._drain(timeout=0.5)
            if time.monotonic() >= next_log:
                log.info("round %d: waiting for devices: %d of %d online", round_, len(self._online()),
                         self.min_devices)
                next_log += log_every_s

    def _task(self, round_: int, device: Device) -> tuple[wire.RoundTask, dict[int, list[int]]]:
        cfg = self.config
        params, slot_map, target = self.method.task_fields(self.manifest.tier(device.tier), device.history,
                                                           self.state.global_arrays)
        task = wire.RoundTask(federation=cfg.federation, round=round_, device_id=device.device_id, tier=device.tier,
                              slot_map={str(layer): list(slots) for layer, slots in slot_map.items()},
                              lambda_bal=cfg.lambda_bal, lambda_het=cfg.lambda_het, het_target=target,
                              local_steps=cfg.local_steps, learning_rate=cfg.learning_rate,
                              deadline_s=cfg.round_deadline_s, upload_dtype=cfg.upload_dtype,
                              logit_prior=cfg.logit_prior, own_labels_only=cfg.own_labels_only,
                              report_label_counts=cfg.head_weighting == "labels",
                              params={k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()})
        return task, slot_map

    def _collect(self, round_: int, participants: list[str]) -> RoundOutcome | None:
        cfg = self.config
        self.method.begin_round(self.state.global_arrays)
        self._folded = 0
        if self.config.audit_log:
            audit.start_round(self.store.folder, round_)
        self.receiver.keep_round(round_)
        self._start_collecting()
        open_tasks: dict[str, OpenTask] = {}
        for device_id in participants:
            task, slot_map = self._task(round_, self.devices[device_id])
            chunks = wire.encode(task, chunk_size=cfg.chunk_size)
            open_tasks[device_id] = OpenTask(task, slot_map, time.monotonic(), sum(map(len, chunks)))
            self.connection.publish_chunks(wire.task_topic(cfg.federation, device_id), chunks, wire.QOS_TASK)
        log.info("round %d: %d participants: %s", round_, len(participants), ", ".join(participants))
        outcome = RoundOutcome(bytes_down=sum(t.bytes_down for t in open_tasks.values()))
        for device_id, task in open_tasks.items():
            device = self.devices[device_id]
            outcome.devices[device_id] = {"profile": device.profile, "tier": device.tier, "status": "missed",
                                          "bytes_down": task.bytes_down, "bytes_up": 0}
        deadline = time.monotonic() + cfg.round_deadline_s
        waiting = dict.fromkeys(open_tasks)  # unanswered, in send order: no per-message scan of every task
        next_scan = time.monotonic() + RESEND_SCAN_S
        while waiting and time.monotonic() < deadline:
            if self._stop.is_set():
                return None
            message = self._drain(timeout=RESEND_SCAN_S)
            now = time.monotonic()
            scan = now >= next_scan
            if scan:
                next_scan = now + RESEND_SCAN_S
            for device_id in self._resends_due(message, waiting, open_tasks, now, scan):
                # A fresh message id: receivers drop a repeated id as a transport duplicate, but
                # this is a deliberate retry (the device answers it with its cached update).
                task = open_tasks[device_id]
                task.sent_at = now
                self.connection.publish_chunks(wire.task_topic(cfg.federation, device_id),
                                               wire.encode(task.message, chunk_size=cfg.chunk_size))
            if isinstance(message, (wire.Update, wire.ErrorReply)):
                self._answer(round_, message, open_tasks, outcome)
            elif isinstance(message, wire.Presence) and not message.online:
                self._went_offline(round_, message.device_id, open_tasks, outcome)
            device_id = getattr(message, "device_id", None)
            if device_id in waiting and open_tasks[device_id].answered:
                del waiting[device_id]
        self._stop_collecting()
        for device_id, reason in outcome.failed.items():
            outcome.devices[device_id]["status"] = "missed" if reason == "went offline" else "failed"
        for device_id, task in open_tasks.items():
            if not task.answered:
                outcome.failed[device_id] = "missed the round deadline"
                log.warning("round %d: %s missed the deadline (%.0f s)", round_, device_id, cfg.round_deadline_s)
        return outcome

    def _resends_due(self, message, waiting, open_tasks: dict[str, OpenTask], now: float, scan: bool) -> list[str]:
        """Open tasks to send again: a waiting device that (re)announced itself, and on a `scan` every
        waiting task older than the re-send interval; each once, in order."""
        due = [message.device_id] if isinstance(message, wire.Hello) and message.device_id in waiting else []
        if scan:
            due += [d for d in waiting if now - open_tasks[d].sent_at > self.config.resend_interval_s]
        return list(dict.fromkeys(due))

    def _went_offline(self, round_: int, device_id: str, open_tasks: dict[str, OpenTask],
                      outcome: RoundOutcome) -> None:
        """An offline Presence (its last will, or an emulated dropout) fails an unanswered task."""
        task = open_tasks.get(device_id)
        if task is not None and not task.answered:
            task.answered = True
            outcome.failed[device_id] = "went offline"
            log.warning("round %d: %s went offline", round_, device_id)

    def _answer(self, round_: int, message, open_tasks: dict[str, OpenTask], outcome: RoundOutcome) -> None:
        task = open_tasks.get(message.device_id)
        if message.round != round_ or task is None:
            log.info("dropped a late or unsolicited %s from %s for round %s (current round %d)", message.kind,
                     message.device_id, message.round, round_)
            return
        if task.answered:
            return  # a duplicate of an update already counted
        task.answered = True
        if isinstance(message, wire.ErrorReply):
            outcome.failed[message.device_id] = f"{message.code.name}: {message.message}"
            log.warning("round %d: %s failed: %s %s", round_, message.device_id, message.code.name, message.message)
            return
        tier = self.manifest.tiers.get(message.tier)
        update = self.method.to_update(message, task.slot_map, tier) if tier else None
        problems = self.method.problems(update, tier) if tier else [f"unknown tier {message.tier!r}"]
        size = self.receiver.take_bytes(message.device_id, round_)
        if size > self.config.max_update_bytes:
            problems.append(f"update of {size} bytes exceeds the limit of {self.config.max_update_bytes}")
        if problems:
            outcome.failed[message.device_id] = "; ".join(problems)
            log.warning("round %d: rejected the update of %s: %s", round_, message.device_id, "; ".join(problems))
            return
        try:
            self.strategy.fold(update)
        except UpdateRejected as err:
            outcome.failed[message.device_id] = str(err)
            log.warning("round %d: rejected the update of %s: %s", round_, message.device_id, err)
            return
        if self.config.audit_log:
            audit.record(self.store.folder, round_, self._folded, update)
        self._folded += 1
        self._count(outcome, message.device_id, size, message.metrics, self.method.history(update))

    def _count(self, outcome: RoundOutcome, device_id: str, size: int, metrics: dict, history) -> None:
        """Record a folded update: the device's history for its next slot plan, and the round's record."""
        self.devices[device_id].history = history
        outcome.updates += 1
        outcome.bytes_up += size
        outcome.metrics.append(dict(metrics))
        outcome.devices[device_id].update(
            status="ok", bytes_up=size, emulated_s=metrics.get("emulated_s"),
            compute_s=metrics.get("emulated_compute_s"), transfer_s=metrics.get("emulated_transfer_s"),
            holdout_accuracy=metrics.get("holdout_accuracy"), peak_rss_mb=metrics.get("peak_rss_mb"),
            usage={str(layer): counts.tolist() for layer, counts in (history or {}).items()})

    def _close(self, round_: int, participants: list[str], outcome: RoundOutcome, attempt: int,
               wall: float) -> None:
        new_global, stats = self.strategy.finish()
        times = [d["emulated_s"] for d in outcome.devices.values() if d.get("emulated_s") is not None]
        record = {"round": round_, "attempt": attempt, "participants": len(participants), "updates": outcome.updates,
                  "failed": outcome.failed, "bytes_up": outcome.bytes_up, "bytes_down": outcome.bytes_down,
                  "wall_round_s": round(wall, 3), "emulated_round_s": max(times) if times else None,
                  "samples": stats.samples, "clipped": stats.clipped, "devices": outcome.devices,
                  "usage": {str(k): v.tolist() for k, v in stats.usage_share.items()},
                  "pseudo_grad_norm": stats.pseudo_grad_norm,
                  "usage_entropy": float(np.mean(list(stats.usage_entropy.values()))) if stats.usage_entropy else None}
        for key in ("loss", "accuracy", "holdout_accuracy", "holdout_loss"):
            values = [m[key] for m in outcome.metrics if key in m]
            weights = [m.get("holdout_samples" if key.startswith("holdout") else "samples_seen", 1.0)
                       for m in outcome.metrics if key in m]
            record[f"device_{key}"] = float(np.average(values, weights=weights)) if values else None
        if self.evaluate is not None:
            record.update(self.evaluate(new_global))
        committed = ServerState(round=round_ + 1, global_arrays=new_global, optimizer=self.method.optimizer_state(),
                                usage=self.usage(),
                                backbone_sha256=self.state.backbone_sha256, last_record=record)
        self.store.commit(committed)  # raises StateError (the round fails loudly) before the state advances
        self.state = committed
        acc = record.get("test_accuracy", record["device_holdout_accuracy"])
        log.info("round %d done: %d/%d updates, %s accuracy %s, %.1f kB up, %.1f kB down, %.1f s wall%s", round_,
                 outcome.updates, len(participants), "test" if "test_accuracy" in record else "held-out",
                 f"{acc:.3f}" if acc is not None else "n/a", outcome.bytes_up / 1e3, outcome.bytes_down / 1e3, wall,
                 f", {record['emulated_round_s']:.1f} s emulated" if record["emulated_round_s"] is not None else "")
        self.connection.publish_chunks(wire.global_topic(self.config.federation),
                                       wire.encode(wire.GlobalState(round=round_, expert_usage=self.usage())),
                                       wire.QOS_GLOBAL)
