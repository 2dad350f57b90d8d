"""`fftmoe bench accuracy`: every method on the same partitions, fleet and seeds, as a resumable grid.

A cell is (partition, method or ablation, seed), run as its own subprocess (`fftmoe run --method M`
or `python -m hw_profiles.references local|central`) into `OUT/cells/<partition>/<name>/seed<k>/run`
with its output in `log.txt` there. A cell is finished when its `cell.json` (its summary, written
atomically and last) exists; re-running skips finished cells and starts unfinished ones over, so the
grid can run in the background for days and be stopped and restarted at any time. After every cell
`OUT/accuracy.md`, `OUT/accuracy.json` and `OUT/accuracy.png` are rewritten from all finished cells
(partial tables while the grid runs). An ablation is an FFT-MoE run with one option changed; "both on"
is the fft-moe cell itself. The numbers come from the cells' own `metrics.jsonl`: this module measures,
trains and aggregates nothing itself, and it is not a timed benchmark.

Exit codes: 0 every planned cell finished; 1 some cell failed (each named with its log); 2 bad options,
an OUT folder holding cells of other settings, or another bench running on OUT; 130 stopped by
Ctrl-C or SIGTERM (the running cell is stopped with its device processes and runs again next time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.local_state import atomic_write_bytes
from hw_profiles.bench_tables import (
    _DIR, ABLATIONS, METHODS, REFERENCES, render_markdown, summary, varied_method, write_plot,
)
from hw_profiles.report import finite, load_run, mean_known

DEFAULT_FLEET = "pi-zero-2w:1,pi3b-plus:1,pi4-2gb:1,pi4-4gb:1,pi5-8gb:1,jetson-nano:1,orin-nano:1,agx-orin:1"
PASS_THROUGH = ("model", "tiers", "dataset", "text_column", "label_column", "cache", "learning_rate", "device_tiers")
SETTINGS = ("fleet", "rounds", "local_steps", "model", "tiers", "dataset", "text_column", "label_column",
            "learning_rate", "device_tiers")  # what makes cells comparable; a folder holds cells of one setting only


class BenchError(ValueError):
    """A bad option or an unusable output folder; one line for the user, exit 2."""


@dataclass(frozen=True)
class Cell:
    partition: str  # "iid" or "dirX"
    name: str  # a method or an ablation
    seed: int

    @property
    def kind(self) -> str:
        return "ablation" if self.name in ABLATIONS else "method"

    @property
    def key(self) -> str:
        return f"{self.partition}/{self.name}/seed{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / "cells" / self.partition / self.name / f"seed{self.seed}"


def partition_flags(name: str) -> list[str]:
    """`iid` -> --partition iid; `dir0.5` -> --partition dirichlet --alpha 0.5."""
    if name == "iid":
        return ["--partition", "iid"]
    match = _DIR.match(name)
    if not match or not float(match.group(1)) > 0:
        raise BenchError(f"unknown partition {name!r}: use iid or dirALPHA with ALPHA > 0 (e.g. dir0.5)")
    return ["--partition", "dirichlet", "--alpha", match.group(1)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fftmoe bench accuracy", description="Accuracy of every method on the same "
                                "partitions, fleet and seeds; resumable, with partial tables as cells finish.")
    p.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"), help="bench folder (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list from: " + ", ".join(METHODS))
    p.add_argument("--partitions", default="iid,dir0.5,dir0.1", help="comma list of iid and dirALPHA")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="comma list from: " + ", ".join(ABLATIONS)
                   + " (FFT-MoE variants), or none")
    p.add_argument("--ablation-partitions", default="dir0.1", help="partitions the ablations run at")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the seeded methods; the others use the first")
    p.add_argument("--seeded-methods", default="fft-moe,hetlora", help="methods (or ablations) run at every seed")
    p.add_argument("--fleet", default=DEFAULT_FLEET, help="fleet of every cell (default: 8 devices, one per profile)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per cell (default %(default)s)")
    p.add_argument("--local-steps", type=int, default=20, help="local steps per round (default %(default)s)")
    for flag in PASS_THROUGH:
        p.add_argument("--" + flag.replace("_", "-"), type=float if flag == "learning_rate" else str,
                       help="passed to every cell (default: fftmoe run's)")
    p.add_argument("--only-report", action="store_true", help="rebuild the tables and plot from finished cells")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout at the end")
    return p


def _names(text: str, known=None, what: str = "") -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in names if known is not None and x not in known]
    if unknown:
        raise BenchError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def parse_options(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.methods = _names(args.methods, METHODS, "method")
    args.ablations = [] if args.ablations.strip() == "none" else _names(args.ablations, tuple(ABLATIONS), "ablation")
    args.seeded_methods = _names(args.seeded_methods, METHODS + tuple(ABLATIONS), "seeded method")
    args.partitions, args.ablation_partitions = _names(args.partitions), _names(args.ablation_partitions)
    for name in args.partitions + args.ablation_partitions:
        partition_flags(name)
    try:
        args.seeds = [int(x) for x in _names(args.seeds)]
    except ValueError:
        raise BenchError(f"--seeds {args.seeds!r} must be a comma list of integers") from None
    if not args.seeds or not args.methods and not args.ablations or not args.partitions:
        raise BenchError("nothing to run: give at least one seed, one partition and one method or ablation")
    if args.rounds < 1 or args.local_steps < 1:
        raise BenchError("--rounds and --local-steps must be at least 1")
    from hw_profiles.fleet import FleetError, parse_fleet

    try:
        parse_fleet(args.fleet)
    except FleetError as err:
        raise BenchError(str(err)) from None
    return args


def plan_cells(args) -> list[Cell]:
    """Every cell, ordered so partial tables fill usefully: first seed of every method, then the
    ablations, then the extra seeds."""
    cells = []
    for rank, seed in enumerate(args.seeds):
        groups = ((0, args.methods, args.partitions), (1, args.ablations, args.ablation_partitions))
        for group, names, partitions in groups:
            for p_index, partition in enumerate(partitions):
                for n_index, name in enumerate(names):
                    if rank == 0 or name in args.seeded_methods:
                        cells.append(((rank > 0, group, rank, p_index, n_index), Cell(partition, name, seed)))
    return [cell for _, cell in sorted(cells, key=lambda x: x[0])]


def cell_command(cell: Cell, args, run_dir: Path) -> list[str]:
    common = ["--fleet", args.fleet, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps)]
    for flag in PASS_THROUGH:
        if getattr(args, flag) is not None:
            common += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    common += partition_flags(cell.partition) + ["--seed", str(cell.seed), "--out", str(run_dir)]
    if cell.name in REFERENCES:
        return [sys.executable, "-m", "hw_profiles.references", cell.name] + common
    method = varied_method(cell.name) if cell.kind == "ablation" else cell.name
    return [sys.executable, "-m", "fftmoe.cli", "run"] + common + ["--method", method] + ABLATIONS.get(cell.name, [])


def summarise_run(run_dir: Path) -> dict:
    """The numbers of one finished run folder (metrics.jsonl, fleet.json); raises BenchError if it has none."""
    fleet, rounds = load_run(run_dir)
    curve = [{"round": r["round"], "test_accuracy": finite(r.get("test_accuracy")),
              "device_holdout_accuracy": finite(r.get("device_holdout_accuracy"))} for r in rounds]
    accs = [c["test_accuracy"] for c in curve if c["test_accuracy"] is not None]
    if not accs:
        raise BenchError(f"{run_dir / 'metrics.jsonl'} has no round with a test accuracy")

    def per_device(key, count):  # mean over rounds of the round's total / the devices it counts
        return mean_known(finite(r.get(key)) / r[count] if finite(r.get(key)) is not None and r.get(count) else None
                          for r in rounds)

    held = [c["device_holdout_accuracy"] for c in curve if c["device_holdout_accuracy"] is not None]
    return {"method": fleet.get("method"), "rounds_completed": len(rounds), "curve": curve,
            "final_test_accuracy": accs[-1], "best_test_accuracy": max(accs),
            "holdout_accuracy": held[-1] if held else None,
            "bytes_up_per_device_round": per_device("bytes_up", "updates"),  # per device that uploaded
            "bytes_down_per_device_round": per_device("bytes_down", "participants"),
            "emulated_round_s": mean_known(finite(r.get("emulated_round_s")) for r in rounds),
            "usage_entropy": finite(rounds[-1].get("usage_entropy")), "devices": len(fleet.get("devices") or [])}


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies aside: orphans may never be reaped)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _wait(process: subprocess.Popen) -> int:
    """The cell's exit code; on Ctrl-C or SIGTERM its whole process group (the run and its device
    processes) gets SIGTERM, then SIGKILL after 30 s, before the interrupt goes on."""
    try:
        return process.wait()
    except BaseException:
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while (process.poll() is None or _group_alive(process.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.poll() is not None and not _group_alive(process.pid):
                break
        raise


def run_cell(cell: Cell, args, out: Path) -> dict:
    """Run one cell from scratch; its summary (also in cell.json), or BenchError naming its log."""
    folder = cell.folder(out)
    run_dir, log = folder / "run", folder / "log.txt"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted or failed attempt starts over
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.json").unlink(missing_ok=True)
    cmd = cell_command(cell, args, run_dir)
    started = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()  # a session of its own, so stopping the bench can stop the run and its devices as one group
        code = _wait(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        if code != 0:
            raise BenchError(f"exit code {code}")
        record = summarise_run(run_dir)
    except BenchError as err:
        failure = {"cell": cell.key, "error": str(err), "log": str(log), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_bytes(folder / "failed.json", (json.dumps(failure) + "\n").encode())
        raise BenchError(f"{err}; log: {log}") from None
    record.update(partition=cell.partition, name=cell.name, kind=cell.kind, seed=cell.seed,
                  wall_s=round(time.time() - started, 1), run_dir=str(run_dir.relative_to(out)), command=cmd)
    atomic_write_bytes(folder / "cell.json", (json.dumps(record, indent=1) + "\n").encode())
    _drop_bulk(run_dir)
    return record


def _drop_bulk(run_dir: Path) -> None:
    """Free the disk a finished cell no longer needs (the grid has dozens): the ready-to-serve model
    (~90 MB with MiniLM) and the server's array snapshots. Metrics, fleet, report, logs and the final
    global adapter stay."""
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    for snapshot in (run_dir / "state").glob("*.npz"):
        snapshot.unlink()


def load_cells(out: Path) -> tuple[list[dict], list[dict]]:
    """(finished cell records, failure records of unfinished cells) found under OUT/cells."""
    finished, failed = [], []
    for path in sorted((out / "cells").glob("*/*/seed*/cell.json")):
        try:
            finished.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # unreadable: the cell counts as not finished and runs again
    for path in sorted((out / "cells").glob("*/*/seed*/failed.json")):
        if not (path.parent / "cell.json").is_file():
            try:
                failed.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # being rewritten; the next report lists it
    return finished, failed


def write_outputs(out: Path, settings: dict, planned: list[Cell]) -> dict:
    """Rewrite accuracy.md / .json / .png from every finished cell; returns the JSON summary. Failures and
    pending cells are those of the planned cells (a failure of a cell no longer asked for is ignored)."""
    finished, failed = load_cells(out)
    keys = {c.key for c in planned}
    pending = sum(not (c.folder(out) / "cell.json").is_file() for c in planned)
    result = summary(finished, settings, [f for f in failed if f.get("cell") in keys], pending)
    atomic_write_bytes(out / "accuracy.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out / "accuracy.md", render_markdown(result).encode())
    if result["rows"]:
        write_plot(out / "accuracy.png", result)
    return result


def _same_setting(saved, asked) -> bool:
    """Equal, or two names of one file's content (a tiers file given relative here and absolute there,
    or a copy of it in another checkout): the cells depend on what the file says, not on its name."""
    if saved == asked:
        return True
    if not (isinstance(saved, str) and isinstance(asked, str)):
        return False
    a, b = Path(saved), Path(asked)
    try:
        return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _saved_settings(out: Path) -> dict | None:
    """The settings OUT's cells were run with (its bench.json), or None for a new folder."""
    path = out / "bench.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchError(f"{path} is unreadable ({err}); fix or delete it") from None


def _check_settings(out: Path, settings: dict, saved: dict | None) -> None:
    if saved is not None:
        diff = [f"{k} {saved.get(k)!r} here vs {settings[k]!r} asked" for k in SETTINGS
                if not _same_setting(saved.get(k), settings[k])]
        if diff:
            raise BenchError(f"{out} holds cells run with other settings ({'; '.join(diff)}); use another --out")
    else:
        atomic_write_bytes(out / "bench.json", (json.dumps(settings, indent=1) + "\n").encode())


def _fleet_tiers(args, out: Path, saved: dict | None) -> str | None:
    """The tiers every cell's devices train: --device-tiers, else what the folder was made with, else (a new
    folder) what `fftmoe run` would choose from the FFT-MoE export's measurements, pinned from then on.
    Unpinned, each cell's export re-measures step times that vary by about 10% between exports, and
    devices near a boundary change tier from cell to cell. Folders made before pinning stay unpinned."""
    if args.device_tiers is not None:
        return args.device_tiers
    if saved is not None:
        return saved.get("device_tiers")
    from edge_runtime.manifest import ManifestError, load_manifest
    from hw_profiles.fleet import FleetError, parse_fleet
    from hw_profiles.partition import PartitionError
    from hw_profiles.profiles import ProfileError, calibrate_host_core_gflops
    from hw_profiles.run import assign_tiers, export_cached, parse_args as run_args

    common = cell_command(Cell("iid", "fft-moe", args.seeds[0]), args, out / "pinning")[4:]
    options = run_args(common[:common.index("--out")])
    try:
        members = assign_tiers(parse_fleet(args.fleet), load_manifest(export_cached(options)), options,
                               calibrate_host_core_gflops())
    except (FleetError, ManifestError, PartitionError, ProfileError, RuntimeError) as err:  # RuntimeError: export
        raise BenchError(f"choosing the device tiers: {err}") from None
    tiers = ",".join(tier for _, _, tier in members)
    _progress(f"device tiers, pinned for every cell: {tiers} (give --device-tiers to choose them)")
    return tiers


def _lock(out: Path):
    """An exclusive lock on OUT for this process's lifetime (the kernel drops it if we die)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".bench.lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BenchError(f"another fftmoe bench accuracy is running on {out}") from None
    return fh


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_options(argv)
        settings = {k: getattr(args, k) for k in SETTINGS}
        out, cells = args.out, plan_cells(args)
        if args.only_report:
            if not out.is_dir():
                raise BenchError(f"no bench folder at {out}")
            settings = _saved_settings(out) or settings
            result = write_outputs(out, settings, cells)
        else:
            lock = _lock(out)
            try:
                saved = _saved_settings(out)
                settings["device_tiers"] = args.device_tiers = _fleet_tiers(args, out, saved)
                _check_settings(out, settings, saved)
                result = _run_grid(args, out, cells, settings)
            finally:
                lock.close()
            if result is None:
                return 130
    except BenchError as err:
        print(f"fftmoe bench accuracy: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    print(f"tables: {out / 'accuracy.md'} (JSON: {out / 'accuracy.json'}, plot: {out / 'accuracy.png'})")
    return 1 if result["failed"] else 0


def _run_grid(args, out: Path, cells: list[Cell], settings: dict) -> dict | None:
    """Run the unfinished cells in order; the final summary, or None when stopped by a signal."""
    todo = [c for c in cells if not (c.folder(out) / "cell.json").is_file()]
    done = len(cells) - len(todo)
    _progress(f"{len(cells)} cells: {done} already finished (skipped), {len(todo)} to run in {out}")
    walls: dict[str, list[float]] = {}  # name -> wall seconds of its finished cells, for the ETA
    for record in load_cells(out)[0]:
        walls.setdefault(record.get("name"), []).append(record.get("wall_s") or 0.0)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    started, result = time.time(), None
    try:
        for i, cell in enumerate(todo):
            k = done + i + 1
            _progress(f"{k}/{len(cells)} {cell.key}: running (log {cell.folder(out) / 'log.txt'})")
            try:
                record = run_cell(cell, args, out)
                walls.setdefault(cell.name, []).append(record["wall_s"])
                what = f"final test accuracy {record['final_test_accuracy']:.3f} in {_duration(record['wall_s'])}"
            except BenchError as err:
                what = f"FAILED ({err})"
            every = [w for ws in walls.values() for w in ws]
            eta = sum(mean_known(walls.get(c.name, [])) or mean_known(every) or 0.0 for c in todo[i + 1:])
            _progress(f"{k}/{len(cells)} {cell.key}: {what}; elapsed {_duration(time.time() - started)}, "
                      f"ETA {_duration(eta) if every or i + 1 == len(todo) else 'unknown'}")
            result = write_outputs(out, settings, cells)
    except KeyboardInterrupt:
        _progress("stopped; finished cells are kept: run the same command again to resume")
        write_outputs(out, settings, cells)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is None:  # nothing ran: the tables of what is there
        result = write_outputs(out, settings, cells)
    if result["failed"]:
        _progress(f"{len(result['failed'])} cell(s) failed; each is listed with its log in {out / 'accuracy.md'}")
    return result


if __name__ == "__main__":
    sys.exit(main())
