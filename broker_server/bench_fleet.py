"""`fftmoe bench fleet`: N simulated devices upload one round through a real broker on loopback.

For each client count N, `--repeats` rounds (default 3) of two alternating passes against one broker:
  aggregate   a subscriber process does what the aggregation server does with every upload: the
              network thread runs the server's `UploadReceiver` (reassembly with the server's limits,
              binding to the topic, queueing); the main thread turns each message into a `ClientUpdate`
              (as `MoeMethod.to_update`), checks it with `validate_update` against the tier's shapes,
              folds it into an `FftMoeStrategy` and acknowledges it; after the N-th it runs `finish()`.
  broker-only the same publishers against a subscriber that only counts payloads and bytes (no
              decode, no fold): the broker's own rate on this host, for comparison.
Reported per N: updates/s and MB/s of MQTT payload (N, resp. bytes, over the time from the round's
start to the last update folded / last payload received), the aggregating subscriber's peak RSS
(VmHWM: ru_maxrss would carry the parent's peak across fork+exec), the round close time (round start
to `finish()` done; `finish_ms` alone is in the JSON), the deepest its inbox queue got, and the same
rates for broker-only. This host is shared and noisy, and load only ever slows a pass down, so the
fastest pass of each kind is reported (every pass's rate is in the JSON) with the worst peak RSS
and inbox depth seen. The rates include the `--jitter-ms` spread of upload starts, so they measure
capacity only when N / spread exceeds it; `offered_updates_per_s` in the JSON says what that bound is.
The publishers share the host's cores with the broker and the aggregator: `publisher_cpu_s` and
`server_cpu_s` (process CPU time, setup included) in the JSON show how much of it each side took,
`host_cpu_busy` per pass how much of all the cores was busy, and the aggregator's capacity alone
(in memory, one core, `bench_fleet_capacity.py`) whether it or the shared host is the limit.

Simulated devices do not train: every device publishes a real `wire.Update` (its own device id on
its own `wire.upload_topic(fed, device, round)`, the tier's parameter names and shapes, routed tokens
and sample count), encoded and chunked by `wire.encode`, with QoS 1, waiting for the broker's
acknowledgements through `MqttConnection.publish_chunks` as the device agent does. Identities map
to connections as follows: `--publishers` processes (default 2) each hold `--connections` MQTT
connections (default 4), each driven by two threads; device i belongs to publisher i mod P, whose
devices are uploaded in start-time order, each by the next thread that is free (so at most two
uploads per connection are in flight). Why not one connection per device: 5,000 paho clients would need 5,000 network threads
or processes on a 2-core host, and the host, not the broker or the aggregator, would be measured.
The broker sees the same topics, payloads and QoS as from a real fleet; what differs is the number
of TCP connections and their keepalive traffic. Start times are uniform in [0, jitter) per device
(seeded), and publishers start together on a signal once all are connected.

Shapes are the default export's tiers (computed without torch, as in `bench_aggregate`) or an
export's manifest (`--artifacts DIR`). Brokers: Debian's mosquitto on a free loopback port (the
default when installed, with the fleet config's `max_queued_messages`), the embedded amqtt broker,
or an external `mqtt://host:port` (shared with others: the numbers then include their traffic).
Scaling out: `--workers 1,2` adds, per N, passes through real aggregator worker processes on upload
lanes with a coordinating process that merges their exact partial sums (bench_fleet_workers.py).
This is a benchmark, never a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from broker_server.bench_aggregate import load_shapes, peak_rss_mb
from broker_server.bench_fleet_capacity import BenchFold, HostCpu, aggregator_capacity, reserve_cores
from broker_server.receiver import UploadReceiver
from broker_server.embedded_broker import loopback_broker, mosquitto_binary
from edge_runtime import wire

PROG = "fftmoe bench fleet"
DEFAULT_CLIENTS = (100, 1000, 5000)
FEDERATION = "benchfleet"
ROUND = 0
READY, GO = "READY", "GO"
CAPACITY_UPLOADS = 200  # encoded uploads the in-memory capacity pass folds


def device_id(i: int) -> str:
    return f"sim-{i:06d}"  # fixed width: every update of a tier has the same encoded size


def slot_map_of(i: int, slots: int, layers, experts: int) -> dict[int, list[int]]:
    """The slot map the server would have handed device i (rotating: contiguous and wrapped alike)."""
    return {layer: [(3 * i + layer + j) % experts for j in range(slots)] for layer in layers}


def tier_of(artifacts: Path | None, name: str):
    """(space, slots, layers) of tier `name`; ValueError naming the known tiers if there is none."""
    space, tiers = load_shapes(artifacts)
    for tier, slots, layers in tiers:
        if tier == name:
            return space, slots, tuple(layers)
    raise ValueError(f"unknown tier {name!r} (tiers: {', '.join(t for t, _, _ in tiers)})")


def make_update(i: int, tier: str, slots: int, layers, params: dict[str, np.ndarray]) -> wire.Update:
    tokens = {str(layer): [int((s * 37 + i) % 97 + 1) for s in range(slots)] for layer in layers}
    return wire.Update(device_id=device_id(i), round=ROUND, tier=tier, params=params, expert_tokens=tokens,
                       num_samples=16 + i % 48, metrics={"loss": 1.0})


def _broker_config(url: str):
    from edge_runtime.mqtt import BrokerConfig

    return BrokerConfig.from_url(url)


def _connect(url: str, client_id: str, subscriptions, on_message, manual_ack: bool = False):
    from edge_runtime.mqtt import MqttConnection

    conn = MqttConnection(_broker_config(url), client_id, subscriptions, on_message, manual_ack=manual_ack)
    conn.start()
    if not conn.wait_connected(timeout=30):
        conn.stop()
        raise SystemExit(f"{PROG}: cannot connect to {url}")
    return conn


def _emit(record) -> None:
    print(record if isinstance(record, str) else json.dumps(record), flush=True)


# -- publisher process -------------------------------------------------------------------------
def run_publisher(args) -> int:
    """Publish the updates of devices i = index, index + P, ... at their jittered start times."""
    space, slots, layers = tier_of(args.artifacts, args.tier)
    rng = np.random.default_rng(args.seed)
    params = {n: (rng.standard_normal(s) * 0.02).astype(np.float32)
              for n, s in space.tier_shapes(layers, slots).items()}
    starts = np.random.default_rng(args.seed + 1).uniform(0, args.jitter_ms / 1000, args.clients)  # [N] s
    mine = sorted(range(args.index, args.clients, args.publishers), key=lambda i: starts[i])
    conns = [_connect(args.broker, f"bench-pub-{args.index}-{c}-{os.getpid()}", [], lambda t, p: None)
             for c in range(args.connections)]
    _emit(READY)
    line = sys.stdin.readline().split()
    if not line or line[0] != GO:
        return 1
    t0 = float(line[1])
    lock, cursor = threading.Lock(), iter(mine)
    totals = {"published": 0, "failed": 0, "payloads": 0, "bytes": 0}

    def work(conn) -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            delay = t0 + starts[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            chunks = wire.encode(make_update(i, args.tier, slots, layers, params), dtype=args.upload_dtype)
            lane = f"bw{i % args.lanes}" if args.lanes else None  # sharded: the worker its task would name
            ok = conn.publish_chunks(wire.upload_topic(FEDERATION, device_id(i), ROUND, lane), chunks, wire.QOS_UPLOAD)
            with lock:
                totals["published" if ok else "failed"] += 1
                totals["payloads"] += len(chunks)
                totals["bytes"] += sum(map(len, chunks))

    threads = [threading.Thread(target=work, args=(conns[k % len(conns)],), daemon=True)
               for k in range(2 * len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals["done_at"], totals["cpu_s"] = time.monotonic(), time.process_time()
    for conn in conns:
        conn.stop()
    _emit(totals)
    return 0


# -- subscriber processes ----------------------------------------------------------------------
def run_counter(args) -> int:
    """Broker-only: count payloads and bytes on the upload subscription; no decode, no fold."""
    state = {"payloads": 0, "bytes": 0, "first_rx": None, "last_rx": None}
    done = threading.Event()

    def receive(topic: str, payload: bytes) -> None:
        now = time.monotonic()
        state["first_rx"] = state["first_rx"] or now
        state["last_rx"] = now
        state["payloads"] += 1
        state["bytes"] += len(payload)
        if state["payloads"] >= args.expect:
            done.set()

    conn = _connect(args.broker, f"bench-count-{os.getpid()}", [(wire.upload_subscription(FEDERATION),
                                                                 wire.QOS_UPLOAD)], receive)
    time.sleep(0.3)  # the SUBACK is not awaited by MqttConnection: let the broker register the subscription
    _emit(READY)
    ok = done.wait(args.timeout)
    conn.stop()
    _emit({**state, "complete": ok, "peak_rss_mb": round(peak_rss_mb(), 1)})
    return 0 if ok else 1


def run_aggregator(args) -> int:
    """The server's receive + validate + fold path on every upload, then finish() after the N-th."""
    space, slots, layers = tier_of(args.artifacts, args.tier)
    fold = BenchFold(space, slots, layers, args.seed + 2, slot_map_of)
    receiver = UploadReceiver(lambda: ROUND)  # the server's network-thread path, acks included
    inbox = receiver.inbox
    state = {"payloads": 0, "bytes": 0, "first_rx": None}

    def receive(topic: str, payload: bytes, ack) -> None:
        state["first_rx"] = state["first_rx"] or time.monotonic()
        state["payloads"] += 1
        state["bytes"] += len(payload)
        receiver(topic, payload, ack)

    conn = _connect(args.broker, f"bench-agg-{os.getpid()}", [(wire.upload_subscription(FEDERATION),
                                                               wire.QOS_UPLOAD)], receive, manual_ack=True)
    rss_setup = peak_rss_mb()
    time.sleep(0.3)
    _emit(READY)
    folded = rejected = deepest = 0
    last_fold = None
    deadline = time.monotonic() + args.timeout
    while folded + rejected < args.expect and time.monotonic() < deadline:  # main thread, as _answer
        deepest = max(deepest, inbox.qsize())
        try:
            message, ack = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if not isinstance(message, wire.Update) or message.tier != args.tier:
            rejected += 1
            ack()
            continue
        if fold(message, int(message.device_id.rsplit("-", 1)[1])):
            folded += 1
        else:
            rejected += 1
        ack()
        last_fold = time.monotonic()
    t = time.monotonic()
    _, stats = fold.strategy.finish()
    closed_at = time.monotonic()
    conn.stop()
    _emit({**state, "wire_rejected": receiver.rejected, "folded": folded, "rejected": rejected,
           "last_fold": last_fold, "closed_at": closed_at, "finish_ms": round(1000 * (closed_at - t), 2),
           "clients_in_stats": stats.clients, "peak_inbox": deepest, "cpu_s": round(time.process_time(), 3),
           "rss_after_setup_mb": round(rss_setup, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    return 0 if folded == args.expect else 1


# -- orchestration -----------------------------------------------------------------------------
def _child(role: str, args, clients: int, **extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "broker_server.bench_fleet", "--role", role, "--broker", args.broker_url,
           "--clients", str(clients), "--tier", args.tier, "--seed", str(args.seed),
           "--jitter-ms", str(args.jitter_ms), "--upload-dtype", args.upload_dtype,
           "--publishers", str(args.publishers), "--connections", str(args.connections)]
    if args.artifacts is not None:
        cmd += ["--artifacts", str(args.artifacts)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if role != "publish" and args.reserved_cores:
        os.sched_setaffinity(proc.pid, args.reserved_cores)  # the subscriber side's own cores
    return proc


def _expect_line(proc: subprocess.Popen, what: str) -> str:
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"the {what} process exited with code {proc.returncode} before answering")
    return line


def start_publishers(args, clients: int, pubs: list[subprocess.Popen], **extra) -> float:
    """Start the publisher processes (appended to `pubs`, so the caller reaps them whatever happens),
    wait until each is connected, and give them all the same start time t0; returns t0."""
    pubs += [_child("publish", args, clients, index=k, **extra) for k in range(args.publishers)]
    for p in pubs:
        if _expect_line(p, "publisher") != READY:
            raise RuntimeError("a publisher did not get ready")
    t0 = time.monotonic() + 0.2
    for p in pubs:
        p.stdin.write(f"{GO} {t0!r}\n")
        p.stdin.flush()
    return t0


def reap(processes) -> None:
    """Wait for each child to exit (30 s), killing any that does not."""
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_pass(args, clients: int, role: str, expect: int) -> tuple[dict, list[dict], float]:
    """One pass: a subscriber of `role`, the publishers, one round. (subscriber, publishers, t0)."""
    timeout = 60 + clients * 0.2
    sink = _child(role, args, clients, expect=expect, timeout=timeout)
    pubs: list[subprocess.Popen] = []
    try:
        if _expect_line(sink, role) != READY:
            raise RuntimeError(f"the {role} process did not get ready")
        t0 = start_publishers(args, clients, pubs)
        time.sleep(max(0.0, t0 - time.monotonic()))
        host = HostCpu()  # from the round's start to the subscriber's last update
        published = [json.loads(_expect_line(p, "publisher")) for p in pubs]
        result = json.loads(_expect_line(sink, role))
        return {**result, "host_cpu_busy": host.busy()}, published, t0
    finally:
        reap((sink, *pubs))


def _broker_pass(args, clients: int, payloads_per_update: int) -> tuple[float, dict]:
    count, pubs, t0 = run_pass(args, clients, "count", clients * payloads_per_update)
    if not count["complete"] or sum(p["failed"] for p in pubs):
        raise RuntimeError(f"broker-only pass: {count['payloads']} of {clients * payloads_per_update} payloads "
                           f"arrived, {sum(p['failed'] for p in pubs)} uploads failed")
    return count["last_rx"] - t0, count


def _aggregate_pass(args, clients: int) -> tuple[float, dict, list[dict], float]:
    agg, pubs, t0 = run_pass(args, clients, "aggregate", clients)
    published = sum(p["published"] for p in pubs)
    if agg["folded"] != clients or published != clients:
        raise RuntimeError(f"aggregating pass: {published} of {clients} uploads acknowledged, {agg['folded']} "
                           f"folded, {agg['rejected']} rejected, {agg['wire_rejected']} payloads refused")
    return agg["last_fold"] - t0, agg, pubs, t0


def measure(args, clients: int, payloads_per_update: int) -> dict:
    """`--repeats` alternating broker-only and aggregating passes; the fastest of each is reported
    (background load only ever slows a pass down), peak RSS and inbox depth are the worst seen."""
    broker_runs, agg_runs = [], []
    for k in range(args.repeats):
        print(f"[fleet] {clients} devices, pass {k + 1}/{args.repeats}: broker only", file=sys.stderr, flush=True)
        broker_runs.append(_broker_pass(args, clients, payloads_per_update))
        print(f"[fleet] {clients} devices, pass {k + 1}/{args.repeats}: aggregating", file=sys.stderr, flush=True)
        agg_runs.append(_aggregate_pass(args, clients))
    span_b, count = min(broker_runs, key=lambda r: r[0])
    span, agg, pubs, t0 = min(agg_runs, key=lambda r: r[0])
    spread = args.jitter_ms / 1000
    return {"clients": clients, "updates_per_s": round(clients / span, 1),
            "mbytes_per_s": round(agg["bytes"] / span / 1e6, 2),
            "server_peak_rss_mb": max(r[1]["peak_rss_mb"] for r in agg_runs),
            "round_close_s": round(agg["closed_at"] - t0, 3),
            "broker_only_updates_per_s": round(clients / span_b, 1),
            "broker_only_mbytes_per_s": round(count["bytes"] / span_b / 1e6, 2),
            "ratio": round(span_b / span, 3), "finish_ms": agg["finish_ms"],
            "peak_inbox": max(r[1]["peak_inbox"] for r in agg_runs),
            "server_rss_after_setup_mb": agg["rss_after_setup_mb"], "updates_folded": agg["folded"],
            "updates_published": sum(p["published"] for p in pubs),
            "mbytes_per_update": round(agg["bytes"] / clients / 1e6, 4),
            "publish_s": round(max(p["done_at"] for p in pubs) - t0, 3),
            "publisher_cpu_s": round(sum(p["cpu_s"] for p in pubs), 2), "server_cpu_s": agg["cpu_s"],
            "host_cpu_busy": agg["host_cpu_busy"], "broker_only_host_cpu_busy": count["host_cpu_busy"],
            "offered_updates_per_s": round(clients / spread, 1) if spread > 0 else None,
            "all_updates_per_s": [round(clients / r[0], 1) for r in agg_runs],
            "all_broker_only_updates_per_s": [round(clients / r[0], 1) for r in broker_runs],
            "all_server_peak_rss_mb": [r[1]["peak_rss_mb"] for r in agg_runs]}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{PROG}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                        help="comma-separated device counts (default 100,1000,5000)")
    parser.add_argument("--tier", default="nano", help="the tier whose update size devices upload (default nano)")
    parser.add_argument("--artifacts", type=Path, help="read shapes and tiers from this export's manifest")
    parser.add_argument("--broker", default=None,
                        help="embedded | mosquitto | mqtt://host:port (default: mosquitto when installed)")
    parser.add_argument("--jitter-ms", type=float, default=200.0, help="upload starts spread uniformly over this")
    parser.add_argument("--upload-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--connections", type=int, default=4, help="MQTT connections per publisher (default 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating broker-only / aggregating passes per N; the fastest of each is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="",
                        help="also measure sharded aggregation with these aggregator worker counts, e.g. 1,2")
    parser.add_argument("--aggregator-cores", type=int, default=0, help="subscribers on the last K cores, broker "
                        "and publishers on the rest (Linux; default 0: all share every core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # child processes
    parser.add_argument("--role", choices=("publish", "count", "aggregate", "shard", "coordinate"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--lanes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser


def _check(parser: argparse.ArgumentParser, args) -> list[int]:
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not counts or min(counts) < 1:
        parser.error("--clients: every count must be >= 1")
    try:
        args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if args.workers and min(args.workers) < 1:
        parser.error("--workers: every count must be >= 1")
    if args.jitter_ms < 0 or min(args.publishers, args.connections, args.repeats) < 1:
        parser.error("--jitter-ms must be >= 0, --publishers, --connections and --repeats >= 1")
    if args.broker is None:
        args.broker = "mosquitto" if mosquitto_binary() else "embedded"
    if args.broker not in ("embedded", "mosquitto"):
        from edge_runtime.mqtt import BrokerConfigError

        try:
            _broker_config(args.broker)
        except BrokerConfigError as err:
            parser.error(f"--broker must be embedded, mosquitto or a URL: {err}")
    elif args.broker == "mosquitto" and not args.role and not mosquitto_binary():
        parser.error("--broker mosquitto: mosquitto is not installed (apt-get install -y mosquitto)")
    try:
        tier_of(args.artifacts, args.tier)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = _check(parser, args)
    if args.role is not None:
        args.clients = counts[0]
        from broker_server.bench_fleet_workers import run_coordinator, run_shard_worker

        args.workers = args.workers[0] if args.workers else 1
        return {"publish": run_publisher, "count": run_counter, "aggregate": run_aggregator,
                "shard": run_shard_worker, "coordinate": run_coordinator}[args.role](args)
    try:
        args.reserved_cores = reserve_cores(args.aggregator_cores) if args.aggregator_cores else None
    except ValueError as err:
        parser.error(str(err))
    space, slots, layers = tier_of(args.artifacts, args.tier)
    params = {n: np.zeros(s, np.float32) for n, s in space.tier_shapes(layers, slots).items()}
    uploads = [(wire.upload_topic(FEDERATION, device_id(i), ROUND),
                wire.encode(make_update(i, args.tier, slots, layers, params), dtype=args.upload_dtype))
               for i in range(CAPACITY_UPLOADS)]
    sample = uploads[0][1]  # every update of the tier encodes to the same size (fixed-width device ids)
    capacity = aggregator_capacity(BenchFold(space, slots, layers, args.seed + 2, slot_map_of), uploads)
    print(f"[fleet] aggregator alone, in memory: {capacity['aggregator_cpu_ms_per_update']} ms CPU per update, "
          f"{capacity['aggregator_capacity_updates_per_s']} updates/s per core", file=sys.stderr, flush=True)
    records = []
    with loopback_broker(args.broker) as (url, described):
        args.broker_url = url
        print(f"[fleet] tier {args.tier}: {sum(map(len, sample)) / 1e6:.3f} MB in {len(sample)} payload(s) per "
              f"update; broker: {described}", file=sys.stderr, flush=True)
        try:
            for n in counts:
                records.append(measure(args, n, len(sample)))
                if args.workers:
                    from broker_server.bench_fleet_workers import measure_sharded

                    records[-1]["sharded"] = measure_sharded(args, n)
                r = records[-1]
                print(f"[fleet] {n} devices: {r['updates_per_s']} updates/s aggregated, "
                      f"{r['broker_only_updates_per_s']} broker only", file=sys.stderr, flush=True)
        except RuntimeError as err:
            print(f"{PROG}: {err}", file=sys.stderr)
            return 1
    if args.json:
        _emit({"benchmark": "fleet", "tier": args.tier, "broker": described, "upload_dtype": args.upload_dtype,
               "jitter_ms": args.jitter_ms, "repeats": args.repeats, "publishers": args.publishers,
               "connections": args.connections, **capacity,
               "aggregator_cores": sorted(args.reserved_cores) if args.reserved_cores else None,
               "shapes": str(args.artifacts or "builtin default export"), "records": records})
        return 0
    from fftmoe.tables import format_table, share

    headers = ("clients", "updates/s", "MB/s", "broker-only updates/s", "broker-only MB/s", "agg/broker",
               "host CPU busy (agg / broker-only)", "server peak RSS MB", "round close s", "finish ms", "peak inbox")
    rows = [(r["clients"], r["updates_per_s"], r["mbytes_per_s"], r["broker_only_updates_per_s"],
             r["broker_only_mbytes_per_s"], f"{r['ratio']:.0%}", f"{share(r['host_cpu_busy'])} / "
             f"{share(r['broker_only_host_cpu_busy'])}", r["server_peak_rss_mb"], r["round_close_s"],
             r["finish_ms"], r["peak_inbox"]) + tuple(
                 f"{s['updates_per_s']} / {s['worker_peak_rss_mb']} / {s['round_close_s']}" for s in r.get("sharded", []))
            for r in records]
    headers += tuple(f"{w} worker(s): updates/s / worker RSS MB / close s" for w in args.workers)
    rss = [r["server_peak_rss_mb"] for r in records]
    print(format_table(headers, rows))
    print(f"tier {args.tier} ({records[0]['mbytes_per_update']} MB per update, {args.upload_dtype}), {described}, "
          f"jitter {args.jitter_ms:g} ms, fastest of {args.repeats} passes; "
          + (f"subscribers on cores {sorted(args.reserved_cores)}, broker and publishers on the rest; "
             if args.reserved_cores else "")
          + f"server peak RSS spread across N: {max(rss) - min(rss):.1f} MB")
    print(f"aggregator alone (in memory, no broker): {capacity['aggregator_capacity_updates_per_s']} updates/s per core "
          f"({capacity['aggregator_cpu_ms_per_update']} ms CPU per update)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
