"""`fftmoe serve --worker`: an aggregator worker, one share of a sharded FFT-MoE round.

With `fftmoe serve --workers N` the server becomes a coordinator (`coordinator.py`): it still
registers devices, samples them, plans their slots and commits every round, but it does not receive
updates. It assigns each participant to a worker and names that worker in the device's task
(`RoundTask.upload_lane`), so the device uploads to `up/{device}/{round}/{worker}` and only that
worker receives the bytes: the receive path, where an aggregator's time goes, is split by client.

A worker, per round (the coordinator's `WorkerPlan` starts it; every message is in `edge_runtime/wire`):
  - folds each assigned device's update, after the server's own checks (tier shapes, NaN / Inf,
    size, sample count), into exact integer sums (`AggregationConfig(exact=True)`, exact_sums.py),
    once per device whatever the duplicates, and answers each with a `WorkerReceipt`;
  - on `WorkerClose`, stops folding and sends its `WorkerPartial`: the int64 sums and counts, with
    the devices they hold. A repeated close gets the same partial; a later plan of the same session
    (devices taken over from a failed worker) reopens the round, and the next partial is cumulative.
The coordinator adds the partials: integer addition, so the round is bit for bit what one process
folding every update with exact sums computes, in any order and any split (tests/test_sharded_*).
A worker keeps nothing on disk and nothing across rounds: if it dies, the coordinator hands its
devices to another worker and re-sends their tasks, and the devices re-send the update they cached.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading

import numpy as np

from broker_server.aggregation import AggregationConfig, RoundPartial, UpdateRejected
from broker_server.methods import make_method
from broker_server.receiver import UploadReceiver
from edge_runtime import wire
from edge_runtime.manifest import Manifest
from edge_runtime.mqtt import BrokerConfig, MqttConnection

log = logging.getLogger("fftmoe.worker")


def default_worker_id() -> str:
    """host-pid: unique per process, so a restarted worker is a new worker to the coordinator."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def plan_settings(config: AggregationConfig, clip_bound: float | None, max_update_bytes: int) -> dict[str, str]:
    """The aggregation options a worker folds with, as WorkerPlan.settings strings."""
    return {"weighting": config.weighting, "personalise_router": str(config.personalise_router).lower(),
            "clip_bound": "" if clip_bound is None else repr(float(clip_bound)),
            "norm_policy": config.norm_policy, "max_update_bytes": str(max_update_bytes)}


def settings_config(settings: dict[str, str]) -> tuple[AggregationConfig, int]:
    """Inverse of `plan_settings`: (exact aggregation config, max update bytes). Every key is required
    (KeyError otherwise): the coordinator's settings are the only source, no defaults here."""
    bound = settings["clip_bound"]
    config = AggregationConfig(weighting=settings["weighting"], exact=True,
                               personalise_router=settings["personalise_router"] == "true",
                               clip_bound=float(bound) if bound else None, norm_policy=settings["norm_policy"])
    return config, int(settings["max_update_bytes"])


def partial_message(worker_id: str, round_: int, session: str, devices: list[str],
                    part: RoundPartial | None) -> wire.WorkerPartial:
    """A strategy's `partial()` as the WorkerPartial a worker sends (None: nothing folded)."""
    if part is None:
        return wire.WorkerPartial(worker_id=worker_id, round=round_, session=session, devices=[], den={},
                                  tokens={}, head_den=[], samples=0, bytes_folded=0, clipped=0, norms=[])
    return wire.WorkerPartial(
        worker_id=worker_id, round=round_, session=session, devices=list(devices),
        den={str(k): v for k, v in part.den.items()}, tokens={str(k): v for k, v in part.tokens.items()},
        head_den=part.head_den, samples=part.samples, bytes_folded=part.bytes_folded, clipped=part.clipped,
        norms=part.norms, params={k: np.ascontiguousarray(v) for k, v in part.sums.items()})


def round_partial(message: wire.WorkerPartial) -> RoundPartial | None:
    """Inverse of `partial_message`: what `FftMoeStrategy.merge` takes (None: the worker folded nothing)."""
    if not message.devices:
        return None
    return RoundPartial(sums=dict(message.params), den={int(k): v for k, v in message.den.items()},
                        tokens={int(k): v for k, v in message.tokens.items()}, head_den=message.head_den,
                        clients=len(message.devices), samples=message.samples, bytes_folded=message.bytes_folded,
                        clipped=message.clipped, norms=list(message.norms))


class _Round:
    """One session's share: the devices assigned, the strategy folding them, what was answered."""

    def __init__(self, plan: wire.WorkerPlan, manifest: Manifest):
        self.round, self.session = plan.round, plan.session
        config, self.max_bytes = settings_config(plan.settings)
        self.method = make_method("fft-moe", manifest, config, gamma=1.0)  # gamma shapes tasks, not the fold
        self.method.begin_round(plan.params)
        self.tiers: dict[str, str] = {}
        self.slot_maps: dict[str, dict[int, list[int]]] = {}
        self.answered: set[str] = set()
        self.folded: list[str] = []
        self.closed = False
        self.add(plan)

    def add(self, plan: wire.WorkerPlan) -> None:
        self.tiers.update(plan.tiers)
        self.slot_maps.update({d: {int(k): v for k, v in m.items()} for d, m in plan.slot_maps.items()})
        self.closed = False  # reopened: devices taken over from a failed worker may still arrive


class AggregatorWorker:
    """Runs until `stop()`: plans in, receipts and partials out, updates folded in between."""

    def __init__(self, worker_id: str, federation: str, manifest: Manifest, broker: BrokerConfig,
                 chunk_size: int = 256 * 1024):
        self.worker_id, self.federation, self.manifest = wire.validate_id(worker_id, "worker id"), federation, manifest
        self.chunk_size = chunk_size
        # Upload bytes count for the round of the newest plan the network thread has seen, not the one the
        # main thread has started: a device's update can arrive while its plan still waits in the inbox,
        # and its bytes would go uncounted (a receipt with bytes_in 0, a round's bytes_up 0).
        self._wire_round: int | None = None
        self.receiver = UploadReceiver(lambda: self._wire_round, busy=lambda: self.connection.awaiting_acks,
                                       seen=self._see)
        self.inbox = self.receiver.inbox
        self._stop = threading.Event()
        self.peak_inbox = 0  # the deepest backlog of received, not yet handled messages (benchmarks)
        self._round: _Round | None = None
        self._last_partial: tuple[tuple[int, str], list[bytes]] | None = None
        self._receipts: dict[str, wire.WorkerReceipt] = {}  # this round's, by device (re-sent on duplicates)
        self._out = wire.worker_topic(federation, worker_id, "out")
        offline = wire.encode(wire.WorkerStatus(worker_id=worker_id, online=False))[0]
        self.connection = MqttConnection(
            broker, client_id=f"fftmoe-worker-{federation}-{worker_id}",
            subscriptions=[(wire.worker_topic(federation, worker_id, "in"), wire.QOS_WORKER),
                           (wire.upload_subscription(federation, worker_id), wire.QOS_UPLOAD),
                           (wire.global_topic(federation), wire.QOS_GLOBAL)],  # the coordinator's roll call
            on_message=self.receiver, will=(self._out, offline, wire.QOS_WORKER, False), on_connect=self._announce,
            manual_ack=True)  # backpressure: see AggregationServer._receive

    def _see(self, message) -> None:
        """On the network thread (UploadReceiver `seen`): a plan names the round uploads come for next."""
        if isinstance(message, wire.WorkerPlan):
            self._wire_round = message.round

    def _announce(self) -> None:
        self._send(wire.WorkerStatus(worker_id=self.worker_id, online=True))

    def _send(self, message) -> None:
        self.connection.publish_chunks(self._out, wire.encode(message, chunk_size=self.chunk_size), wire.QOS_WORKER)

    def _send_receipt(self, receipt: wire.WorkerReceipt) -> None:
        """Receipts go out without waiting for the broker's acknowledgement (a round trip per update
        halved a worker's rate); one lost on a reconnect is sent again when the device's repeated
        upload arrives (`_answer`), so each is also kept until the round ends."""
        self._receipts[receipt.device_id] = receipt
        self.connection.publish_nowait(self._out, wire.encode(receipt, chunk_size=self.chunk_size), wire.QOS_WORKER)

    # -- main thread -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        self.connection.start()
        log.info("worker %s: aggregating for federation %s", self.worker_id, self.federation)
        try:
            while not self._stop.is_set():
                self.peak_inbox = max(self.peak_inbox, self.inbox.qsize())
                try:
                    message, ack = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.handle(message)
                ack()  # only now may the broker send the next message beyond its in-flight window
        finally:
            self.connection.stop(final=(self._out, wire.encode(wire.WorkerStatus(worker_id=self.worker_id,
                                                                                  online=False))[0],
                                        wire.QOS_WORKER, False))
        return 0

    def handle(self, message) -> None:
        if isinstance(message, wire.WorkerPlan):
            self._plan(message)
        elif isinstance(message, wire.WorkerClose):
            self._close(message)
        elif isinstance(message, (wire.Update, wire.ErrorReply)):
            self._answer(message)
        elif isinstance(message, wire.GlobalState) and message.note == wire.ROLL_CALL:
            self._announce()  # a coordinator (re)started after this worker announced itself

    def _plan(self, plan: wire.WorkerPlan) -> None:
        current = self._round
        if current is not None and (plan.round, plan.session) == (current.round, current.session):
            current.add(plan)
            log.info("round %d: %d more devices (taken over)", plan.round, len(plan.tiers))
            return
        if not plan.params:
            log.warning("round %d: a plan that adds devices to session %s, which this worker never started; "
                        "ignored", plan.round, plan.session)
            return
        self._receipts = {}
        try:
            self._round = _Round(plan, self.manifest)
        except (ValueError, KeyError) as err:  # the wrong --artifacts, or settings missing a key
            log.error("round %d: cannot start: %s", plan.round, err)
            self._round = None
            return
        self.receiver.keep_round(plan.round)
        log.info("round %d: aggregating %d devices", plan.round, len(plan.tiers))

    def _answer(self, message) -> None:
        r = self._round
        if r is None or message.round != r.round or message.device_id not in r.tiers or r.closed:
            log.info("dropped a late or unassigned %s from %s for round %s", message.kind, message.device_id,
                     message.round)
            return
        if message.device_id in r.answered:  # a duplicate (QoS 1 redelivery, or the answer to a repeated task)
            if message.device_id in self._receipts:  # its receipt may be what got lost: send it again
                self._send_receipt(self._receipts[message.device_id])
            return
        r.answered.add(message.device_id)
        size = self.receiver.take_bytes(message.device_id, message.round)
        receipt = dict(worker_id=self.worker_id, device_id=message.device_id, round=r.round, session=r.session,
                       bytes_in=size)
        if isinstance(message, wire.ErrorReply):
            reason = f"{message.code.name}: {message.message}"
            self._send_receipt(wire.WorkerReceipt(**receipt, ok=False, reason=reason))
            return
        tier = self.manifest.tiers.get(message.tier)
        slot_map = r.slot_maps[message.device_id]
        update = r.method.to_update(message, slot_map, tier) if tier else None
        problems = r.method.problems(update, tier) if tier else [f"unknown tier {message.tier!r}"]
        if size > r.max_bytes:
            problems.append(f"update of {size} bytes exceeds the limit of {r.max_bytes}")
        if not problems:
            try:
                r.method.strategy.fold(update)
            except UpdateRejected as err:
                problems.append(str(err))
        if problems:
            log.warning("round %d: rejected the update of %s: %s", r.round, message.device_id, "; ".join(problems))
            self._send_receipt(wire.WorkerReceipt(**receipt, ok=False, reason="; ".join(problems)))
            return
        r.folded.append(message.device_id)
        self._send_receipt(wire.WorkerReceipt(**receipt, ok=True, expert_tokens=dict(message.expert_tokens),
                                              metrics=dict(message.metrics)))

    def _close(self, close: wire.WorkerClose) -> None:
        r = self._round
        key = (close.round, close.session)
        if self._last_partial is not None and self._last_partial[0] == key and (r is None or r.closed):
            self.connection.publish_chunks(self._out, self._last_partial[1], wire.QOS_WORKER)  # a repeated close
            return
        if r is None or (r.round, r.session) != key:
            # never started (or already replaced): nothing folded here for that session
            partial = partial_message(self.worker_id, close.round, close.session, [], None)
        else:
            r.closed = True
            partial = partial_message(self.worker_id, r.round, r.session, r.folded, r.method.strategy.partial())
            log.info("round %d: closed with %d updates folded", r.round, len(r.folded))
        chunks = wire.encode(partial, chunk_size=self.chunk_size)
        self._last_partial = (key, chunks)
        self.connection.publish_chunks(self._out, chunks, wire.QOS_WORKER)
