"""`fftmoe serve --workers N`: the round coordinator of sharded aggregation.

`CoordinatorServer` is the aggregation server with the fold moved out to `fftmoe serve --worker`
processes (`workers.py` explains the split and the lanes). It keeps everything else: device
registry, sampling, slot plans, tasks and their re-sends, deadlines, retries, the durable commit,
evaluation and metrics. Per round (one *session* per attempt, so a restarted coordinator or a
retried round never mixes with an older one):
  1. wait for N live workers; assign participants to them round-robin; send each worker its
     `WorkerPlan` (the devices' tiers and slot maps, the aggregation settings, the global arrays),
     then each device its task naming its worker as upload lane;
  2. collect `WorkerReceipt`s (one per device answer) until every task is answered or the deadline;
  3. send `WorkerClose` and collect every worker's `WorkerPartial`; merge them (exact integer sums:
     the bits of a single exact aggregator) and commit the round as the single server does.
A worker whose last will arrives (or that misses the close timeout) is *lost* for the session: its
partial is never used, and its devices, answered or not, are handed to a live worker (a plan that
adds them) and their tasks re-sent on the new lane; the devices answer a repeated task with the update
they cached, so nothing is lost and nothing is counted twice. After the deadline a lost worker's
devices count as failed. The coordinator receives no update bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time

import numpy as np

from broker_server.server import AggregationServer, OpenTask, RoundOutcome
from broker_server.slots import tokens_by_global_expert
from broker_server.workers import plan_settings, round_partial
from edge_runtime import wire

log = logging.getLogger("fftmoe.coordinator")
POLL_S = 0.2


class WorkerPool:
    """Live workers, and per session: who aggregates which device, receipts, partials, losses."""

    def __init__(self):
        self.online: set[str] = set()
        self.begin("")

    def begin(self, session: str) -> None:
        self.session = session
        self.assigned: dict[str, str] = {}  # device -> worker
        self.lost: set[str] = set()  # workers whose share of this session is gone
        self.receipts: dict[str, wire.WorkerReceipt] = {}
        self.partials: dict[str, wire.WorkerPartial] = {}
        self.closing: set[str] = set()  # workers sent a close and not yet answered with a partial

    def live(self) -> list[str]:
        return sorted(self.online - self.lost)

    def assign(self, devices: list[str]) -> dict[str, str]:
        """Round-robin over the live workers, least loaded first; returns device -> worker."""
        live = self.live()
        load = {w: sum(1 for a in self.assigned.values() if a == w) for w in live}
        order = sorted(live, key=lambda w: (load[w], w))
        new = {d: order[i % len(order)] for i, d in enumerate(devices)}
        self.assigned.update(new)
        return new

    def status(self, message: wire.WorkerStatus) -> list[str]:
        """Track a worker's status; the devices to hand over when an assigned worker went away."""
        if message.online:
            if message.worker_id not in self.online:
                log.info("aggregator worker %s is up", message.worker_id)
            self.online.add(message.worker_id)
            return []
        self.online.discard(message.worker_id)
        return self.lose(message.worker_id, "went offline")

    def lose(self, worker: str, why: str) -> list[str]:
        """Declare `worker` lost for this session: its devices (to hand over), partial dropped."""
        devices = sorted(d for d, w in self.assigned.items() if w == worker)
        if worker in self.lost or not devices:
            return []
        log.warning("aggregator worker %s %s; handing its %d devices to another worker", worker, why, len(devices))
        self.lost.add(worker)
        self.partials.pop(worker, None)
        self.closing.discard(worker)
        for d in devices:
            del self.assigned[d]
            self.receipts.pop(d, None)
        return devices


class CoordinatorServer(AggregationServer):
    """Rounds as AggregationServer, aggregation by `config.workers` or more worker processes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.strategy.config.exact:
            raise ValueError("a coordinator merges exact partial sums: build it with exact aggregation")
        self.pool = WorkerPool()
        self._nonce = secrets.token_hex(4)  # this process: sessions of a restarted coordinator differ
        self._attempts = itertools.count()
        self._open: dict[str, OpenTask] = {}  # this round's tasks
        self._planned: set[str] = set()  # workers sent this session's arrays
        self._orphans: list[str] = []  # devices of a lost worker while no worker was live
        self._late: set[str] = set()  # devices of a worker lost after the deadline: failed
        self._round, self._deadline = -1, 0.0
        self._started = False  # the first round waits for config.workers live workers

    def _subscriptions(self) -> list[tuple[str, int]]:
        # the server's own upload topic stays: a device answers an unreadable task there (round "none");
        # updates come on the workers' lanes
        return super()._subscriptions() + [(wire.worker_subscription(self.config.federation), wire.QOS_WORKER)]

    def _drain(self, timeout: float):
        message = super()._drain(timeout)
        if isinstance(message, wire.WorkerStatus):
            self._handover(self.pool.status(message))
        return message

    def _publish(self, topic: str, message) -> None:
        self.connection.publish_chunks(topic, wire.encode(message, chunk_size=self.config.chunk_size), wire.QOS_WORKER)

    # -- a round ---------------------------------------------------------------------------------
    def _collect(self, round_: int, participants: list[str]) -> RoundOutcome | None:
        cfg, pool = self.config, self.pool
        self.method.begin_round(self.state.global_arrays)
        pool.begin(f"{self._nonce}-{round_}-{next(self._attempts)}")
        self._start_collecting()
        self._open, self._planned, self._orphans, self._late = {}, set(), [], set()
        # the first round waits for --workers; later ones go on with whoever is live (at least one)
        while len(pool.live()) < (1 if self._started else cfg.workers):
            if self._stop.is_set():
                return None
            self._drain(timeout=0.5)
        self._started = True
        if len(pool.live()) < cfg.workers:
            log.warning("round %d: %d of %d aggregator workers live", round_, len(pool.live()), cfg.workers)
        self._round = round_
        lanes = pool.assign(participants)
        for device_id in participants:
            task, slot_map = self._task(round_, self.devices[device_id])
            self._open[device_id] = OpenTask(dataclasses.replace(task, upload_lane=lanes[device_id]), slot_map, 0.0, 0)
        self._send_plans(lanes)
        for device_id in participants:
            self._send_task(device_id)
        log.info("round %d: %d participants over %d workers (session %s)", round_, len(participants),
                 len(set(lanes.values())), pool.session)
        outcome = RoundOutcome()
        for device_id in participants:
            device = self.devices[device_id]
            outcome.devices[device_id] = {"profile": device.profile, "tier": device.tier, "status": "missed",
                                          "bytes_down": 0, "bytes_up": 0}
        self._deadline = time.monotonic() + cfg.round_deadline_s
        while True:
            if not self._gather(outcome):
                return None
            closed = self._close_workers()
            if closed is None:
                return None
            if closed:
                break
        self._stop_collecting()
        for device_id, task in self._open.items():
            outcome.devices[device_id]["bytes_down"] = task.bytes_down
        outcome.bytes_down = sum(t.bytes_down for t in self._open.values())
        return self._merge(outcome)

    def _send_plans(self, lanes: dict[str, str]) -> None:
        """One plan per worker for its devices in `lanes`; the session's arrays to a worker's first."""
        settings = plan_settings(self.strategy.config, self.strategy.clip_bound, self.config.max_update_bytes)
        arrays = None  # the global arrays as sent, built only if some worker has not had them this session
        for worker in sorted(set(lanes.values())):
            if arrays is None and worker not in self._planned:
                arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.state.global_arrays.items()}
            devices = [d for d, w in lanes.items() if w == worker]
            plan = wire.WorkerPlan(worker_id=worker, round=self._round, session=self.pool.session,
                                   tiers={d: self._open[d].message.tier for d in devices},
                                   slot_maps={d: dict(self._open[d].message.slot_map) for d in devices},
                                   settings=settings, params=arrays if worker not in self._planned else {})
            self._planned.add(worker)
            self.pool.partials.pop(worker, None)  # it folds more now: its next partial replaces this one
            self._publish(wire.worker_topic(self.config.federation, worker, "in"), plan)

    def _send_task(self, device_id: str) -> None:
        task = self._open[device_id]
        chunks = wire.encode(task.message, chunk_size=self.config.chunk_size)
        task.sent_at, task.bytes_down = time.monotonic(), task.bytes_down + sum(map(len, chunks))
        self.connection.publish_chunks(wire.task_topic(self.config.federation, device_id), chunks, wire.QOS_TASK)

    def _handover(self, devices: list[str]) -> None:
        """Give a lost worker's devices to live workers and re-send their tasks on the new lanes
        (before the deadline; after it they fail)."""
        devices = [d for d in devices if d in self._open]
        if not devices:
            return
        if time.monotonic() >= self._deadline:
            self._late |= set(devices)
            return
        for d in devices:
            self._open[d].answered = False
        if not self.pool.live():  # nobody to send them to yet: assigned when a worker comes up
            self._orphans = sorted(set(self._orphans) | set(devices))
            return
        lanes = self.pool.assign(devices)
        self._send_plans(lanes)
        for d, w in lanes.items():
            self._open[d].message = dataclasses.replace(self._open[d].message, upload_lane=w)
            self._send_task(d)

    def _gather(self, outcome: RoundOutcome) -> bool:
        """Receipts until every task is answered or the deadline; False if stopped."""
        pool = self.pool
        waiting = {d for d, t in self._open.items() if not t.answered}
        next_scan = time.monotonic() + POLL_S
        while waiting and time.monotonic() < self._deadline:
            if self._stop.is_set():
                return False
            if self._orphans and pool.live():
                orphans, self._orphans = self._orphans, []
                self._handover(orphans)
            message = self._drain(timeout=POLL_S)
            now = time.monotonic()
            scan = now >= next_scan
            if scan:  # also picks up devices handed over since: they are unanswered again
                next_scan = now + POLL_S
                waiting = {d for d, t in self._open.items() if not t.answered}
            for device_id in self._resends_due(message, waiting, self._open, now, scan):
                if self._open[device_id].message.upload_lane in pool.live():
                    self._send_task(device_id)
            if isinstance(message, wire.WorkerReceipt):
                self._receipt(message)
            elif isinstance(message, wire.Update):  # on the server's own topic, not its worker's lane
                log.warning("round %d: %s uploaded to the coordinator, not to its worker's lane: a device "
                            "older than wire 1.1? Its update is not counted", self._round, message.device_id)
            elif isinstance(message, wire.Presence) and not message.online:
                self._went_offline(self._round, message.device_id, self._open, outcome)
            device_id = getattr(message, "device_id", None)
            if device_id in waiting and self._open[device_id].answered:
                waiting.discard(device_id)
        return True

    def _receipt(self, message: wire.WorkerReceipt) -> None:
        """A receipt counts if it is this session's and from the worker the device is assigned to."""
        if message.session == self.pool.session and self.pool.assigned.get(message.device_id) == message.worker_id:
            self.pool.receipts[message.device_id] = message
            self._open[message.device_id].answered = True

    def _close_workers(self) -> bool | None:
        """Close every worker holding devices and collect the partials: True when all are in, False if
        a worker was lost before the deadline and its devices went back to collecting, None if stopped."""
        pool, cfg = self.pool, self.config
        pool.closing = set(pool.assigned.values()) - set(pool.partials)
        for worker in sorted(pool.closing):
            self._publish(wire.worker_topic(cfg.federation, worker, "in"),
                          wire.WorkerClose(worker_id=worker, round=self._round, session=pool.session))
        until = time.monotonic() + cfg.close_timeout_s
        while pool.closing:
            if self._stop.is_set():
                return None
            before = dict(pool.assigned)
            message = self._drain(timeout=POLL_S)
            if isinstance(message, wire.WorkerPartial) and message.session == pool.session \
                    and message.worker_id in pool.closing:
                pool.partials[message.worker_id] = message
                pool.closing.discard(message.worker_id)
            elif isinstance(message, wire.WorkerReceipt):
                self._receipt(message)  # sent before the worker saw the close
            if time.monotonic() > until:
                for worker in sorted(pool.closing):
                    self._handover(pool.lose(worker, f"sent no partial sums within {cfg.close_timeout_s:.0f} s"))
            if pool.assigned != before and any(not t.answered for t in self._open.values()):
                return False  # devices handed over before the deadline: collect them again
        return True

    def _merge(self, outcome: RoundOutcome) -> RoundOutcome:
        """Add the partial sums into the strategy and build the round's record from the receipts."""
        pool, counted = self.pool, set()
        for _, message in sorted(pool.partials.items()):
            part = round_partial(message)
            if part is not None:
                self.strategy.merge(part)
                counted |= set(message.devices)
        for device_id, task in self._open.items():
            receipt = pool.receipts.get(device_id)
            if device_id in counted:  # in the sums: counted, whatever became of its receipt
                if receipt is None or not receipt.ok:  # a receipt lost on a worker's reconnect
                    log.warning("round %d: %s is in a worker's partial sums but its receipt never came; "
                                "counted without its metrics", self._round, device_id)
                    self._count(outcome, device_id, 0, {}, None)
                    continue
                tokens = {int(k): np.asarray(v, dtype=np.float64) for k, v in receipt.expert_tokens.items()}
                self._count(outcome, device_id, receipt.bytes_in, receipt.metrics,
                            tokens_by_global_expert(task.slot_map, tokens, self.space.experts))
                continue
            if receipt is not None and not receipt.ok:
                outcome.failed[device_id] = receipt.reason
            elif device_id in self._late:
                outcome.failed[device_id] = "its aggregator worker was lost after the round deadline"
            elif device_id not in outcome.failed:
                outcome.failed[device_id] = "missed the round deadline"
            if outcome.failed[device_id] != "went offline":
                outcome.devices[device_id]["status"] = "failed" if task.answered else "missed"
        return outcome
