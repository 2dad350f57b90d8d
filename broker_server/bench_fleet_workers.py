"""`fftmoe bench fleet --workers 1,2`: the same simulated fleet against sharded aggregation.

For each worker count W, a pass runs W real `AggregatorWorker` processes (workers.py, the code
`fftmoe serve --worker` runs) and one coordinating process that does what `CoordinatorServer` does
with them for one round: it sends each worker a `WorkerPlan` for its devices (device i to worker
i mod W), counts the `WorkerReceipt`s, then closes the round, receives every `WorkerPartial` and
merges them into an exact strategy and finishes it. The publishers upload device i on lane
`bw{i mod W}` (as a task's `upload_lane` tells a real device), so each worker receives only its
share of the bytes. Reported per W, fastest of `--repeats`: updates aggregated per second (N over
round start to the last receipt), MB/s, the workers' and the coordinator's peak RSS, and the round
close time (round start to the merged `finish()`, which includes sending, receiving and merging the
partial sums). Without `--artifacts` the workers run on a manifest built in memory from the default
export's shapes (`bench_manifest`): they need tier shapes, not model files.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

import numpy as np

from broker_server.aggregation import AggregationConfig
from broker_server.bench_aggregate import load_shapes, peak_rss_mb
from edge_runtime import wire


def lane(i: int, workers: int) -> str:
    return f"bw{i % workers}"


def bench_manifest(artifacts):
    """The export's manifest, or one built in memory from the default shapes (no files behind it)."""
    from edge_runtime.manifest import FileEntry, Manifest, TierEntry, load_manifest

    if artifacts is not None:
        return load_manifest(artifacts)
    space, tiers = load_shapes(None)
    tier_entries = {name: TierEntry(name=name, experts_held=slots, top_k=min(2, slots), adapted_layers=tuple(layers),
                                    seq_len=128, batch_size=16, params=(), files={}) for name, slots, layers in tiers}
    return Manifest(schema=1, backbone={}, labels=(), experts=space.experts, rank=0, global_params=tuple(space.entries),
                    train_inputs=(), train_outputs=(), infer_inputs=(), infer_outputs=(), tiers=tier_entries,
                    global_init=FileEntry("none", "", 0), versions={})


def run_shard_worker(args) -> int:
    """A real aggregator worker named bw{index}, until STOP on stdin; then its peak RSS and CPU."""
    import logging

    from broker_server.bench_fleet import FEDERATION, _broker_config, _emit
    from broker_server.workers import AggregatorWorker

    logging.basicConfig(level=os.environ.get("FFTMOE_BENCH_LOG", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s bw{args.index} %(levelname)s %(name)s: %(message)s")

    worker = AggregatorWorker(lane(args.index, args.workers), FEDERATION, bench_manifest(args.artifacts),
                              _broker_config(args.broker))

    def control() -> None:
        if worker.connection.wait_connected(timeout=30):
            time.sleep(0.3)  # the SUBACK is not awaited by MqttConnection
            _emit("READY")
        sys.stdin.readline()
        worker.stop()

    threading.Thread(target=control, daemon=True).start()
    worker.run()
    _emit({"peak_rss_mb": round(peak_rss_mb(), 1), "cpu_s": round(time.process_time(), 3),
           "peak_inbox": worker.peak_inbox})
    return 0


def run_coordinator(args) -> int:
    """Plans for the W workers, receipts, close, partials, merge and finish: one round."""
    from broker_server.bench_fleet import FEDERATION, ROUND, _connect, _emit, device_id, slot_map_of, tier_of
    from broker_server.methods import make_method
    from broker_server.workers import plan_settings, round_partial

    space, slots, layers = tier_of(args.artifacts, args.tier)
    method = make_method("fft-moe", bench_manifest(args.artifacts), AggregationConfig(exact=True), 1.0)
    rng = np.random.default_rng(args.seed + 2)
    global_arrays = {p.name: (rng.standard_normal(p.shape) * 0.02).astype(np.float32) for p in space.entries}
    method.begin_round(global_arrays)
    inbox: queue.Queue = queue.Queue()
    reassembler = wire.Reassembler(max_pending_messages=4096, max_pending_per_source=2)

    def receive(topic: str, payload: bytes) -> None:
        message = reassembler.add(payload, source=topic)
        if message is not None:
            inbox.put(message)

    conn = _connect(args.broker, f"bench-coord-{os.getpid()}", [(wire.worker_subscription(FEDERATION),
                                                                 wire.QOS_WORKER)], receive)
    _emit("SUBSCRIBED")
    names = [lane(k, args.workers) for k in range(args.workers)]
    online: set[str] = set()
    while online != set(names):
        message = inbox.get(timeout=args.timeout)
        if isinstance(message, wire.WorkerStatus) and message.online:
            online.add(message.worker_id)
    session = f"bench-{os.getpid()}"
    settings = plan_settings(method.strategy.config, None, 64 * 1024 * 1024)
    for k, name in enumerate(names):
        mine = [device_id(i) for i in range(k, args.clients, args.workers)]
        plan = wire.WorkerPlan(worker_id=name, round=ROUND, session=session, tiers=dict.fromkeys(mine, args.tier),
                               slot_maps={device_id(i): {str(l): s for l, s in
                                                         slot_map_of(i, slots, layers, space.experts).items()}
                                          for i in range(k, args.clients, args.workers)},
                               settings=settings, params=global_arrays)
        conn.publish_chunks(wire.worker_topic(FEDERATION, name, "in"), wire.encode(plan), wire.QOS_WORKER)
    time.sleep(0.5)  # let the plans (MBs of arrays) be decoded before the first upload arrives
    _emit("READY")
    ok = failed = received = 0
    last = None
    deadline = time.monotonic() + args.timeout
    while ok + failed < args.clients and time.monotonic() < deadline:
        try:
            message = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(message, wire.WorkerReceipt):
            ok, failed, received = ok + message.ok, failed + (not message.ok), received + message.bytes_in
            last = time.monotonic()
    for name in names:
        conn.publish_chunks(wire.worker_topic(FEDERATION, name, "in"),
                            wire.encode(wire.WorkerClose(worker_id=name, round=ROUND, session=session)))
    partials = {}
    while len(partials) < len(names) and time.monotonic() < deadline:
        try:
            message = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(message, wire.WorkerPartial):
            partials[message.worker_id] = message
    t = time.monotonic()
    for part in filter(None, map(round_partial, partials.values())):
        method.strategy.merge(part)
    _, stats = method.strategy.finish()
    closed_at = time.monotonic()
    conn.stop()
    _emit({"ok": ok, "failed": failed, "bytes": received, "last_receipt": last, "closed_at": closed_at,
           "merge_ms": round(1000 * (closed_at - t), 2), "clients_in_stats": stats.clients,
           "partials": len(partials), "peak_rss_mb": round(peak_rss_mb(), 1), "cpu_s": round(time.process_time(), 3)})
    return 0 if ok == args.clients and stats.clients == args.clients else 1


def sharded_pass(args, clients: int, workers: int) -> tuple[float, dict, list[dict], float]:
    """One round with W workers: (span to the last receipt, coordinator record, worker records, t0)."""
    from broker_server.bench_fleet import READY, _child, _expect_line, reap, start_publishers

    coordinator = _child("coordinate", args, clients, workers=workers, timeout=60 + clients * 0.2)
    procs, pubs = [], []
    try:
        if _expect_line(coordinator, "coordinator") != "SUBSCRIBED":
            raise RuntimeError("the coordinator did not subscribe")
        procs = [_child("shard", args, clients, workers=workers, index=k) for k in range(workers)]
        for p in procs:
            if _expect_line(p, "worker") != READY:
                raise RuntimeError("an aggregator worker did not get ready")
        if _expect_line(coordinator, "coordinator") != READY:
            raise RuntimeError("the coordinator did not get ready")
        t0 = start_publishers(args, clients, pubs, lanes=workers)
        for p in pubs:
            _expect_line(p, "publisher")
        result = json.loads(_expect_line(coordinator, "coordinator"))
        worker_records = []
        for p in procs:
            p.stdin.write("STOP\n")
            p.stdin.flush()
            worker_records.append(json.loads(_expect_line(p, "worker")))
    finally:
        reap((coordinator, *procs, *pubs))
    if result["ok"] != clients or result["clients_in_stats"] != clients:
        raise RuntimeError(f"sharded pass with {workers} workers: {result['ok']} of {clients} updates folded, "
                           f"{result['failed']} rejected, {result['partials']} partial sums merged")
    return result["last_receipt"] - t0, result, worker_records, t0


def measure_sharded(args, clients: int) -> list[dict]:
    """Per W in --workers, the fastest of --repeats sharded passes."""
    records = []
    for w in args.workers:
        runs = []
        for k in range(args.repeats):
            print(f"[fleet] {clients} devices, pass {k + 1}/{args.repeats}: {w} aggregator worker(s)",
                  file=sys.stderr, flush=True)
            runs.append(sharded_pass(args, clients, w))
        span, coord, _, t0 = min(runs, key=lambda r: r[0])
        records.append({"workers": w, "updates_per_s": round(clients / span, 1),
                        "mbytes_per_s": round(coord["bytes"] / span / 1e6, 2),
                        "worker_peak_rss_mb": max(x["peak_rss_mb"] for r in runs for x in r[2]),
                        "coordinator_peak_rss_mb": max(r[1]["peak_rss_mb"] for r in runs),
                        "round_close_s": round(coord["closed_at"] - t0, 3), "merge_ms": coord["merge_ms"],
                        "worker_cpu_s": [x["cpu_s"] for x in min(runs, key=lambda r: r[0])[2]],
                        "worker_peak_inbox": max(x["peak_inbox"] for r in runs for x in r[2]),
                        "all_updates_per_s": [round(clients / r[0], 1) for r in runs]})
    return records
