"""Run report: a 2x2 PNG and a self-contained HTML page from a run folder. Reads files only; runs nothing.

The run folder holds `metrics.jsonl` (one JSON object per completed round) and `fleet.json`. Every field is
optional: a partial or crashed run still gets a report, with n/a where data is missing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

TIER_ORDER = ("nano", "small", "medium", "large")
TIER_COLOURS = {"nano": "#d62728", "small": "#ff7f0e", "medium": "#2ca02c", "large": "#1f77b4"}
STATUS_ORDER = ("ok", "missed", "oom", "failed")
NA = "n/a"
MAX_LABELLED_ROUNDS = 12  # beyond this, per-round tick labels would collide


def _tier_key(tier):
    return (TIER_ORDER.index(tier), "") if tier in TIER_ORDER else (len(TIER_ORDER), str(tier))


def _colour(tier):
    return TIER_COLOURS.get(tier, "#7f7f7f")


def finite(value):
    """A finite float, or None for missing / non-numeric / NaN / infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _total(values):
    """Sum of the known values, or None when none is known (n/a rather than a misleading 0)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def mean_known(values):
    """Mean of the known values, or None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def load_run(run_dir):
    """(fleet, rounds) from a run folder; unreadable metrics lines (a round being written) are skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    try:
        fleet = json.loads((run_dir / "fleet.json").read_text())
    except (OSError, ValueError):
        fleet = {}
    rounds = []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            row["round"] = int(finite(row.get("round")) if finite(row.get("round")) is not None else len(rounds))
            devices = row.get("devices") if isinstance(row.get("devices"), dict) else {}
            row["devices"] = {str(k): v if isinstance(v, dict) else {} for k, v in devices.items()}
            rounds.append(row)
    return (fleet if isinstance(fleet, dict) else {}), rounds


def _devices(fleet, rounds):
    """[(device_id, tier)] ordered by tier then id, from fleet.json and whatever the rounds mention."""
    listed = fleet.get("devices") if isinstance(fleet.get("devices"), list) else []
    listed = [d for d in listed if isinstance(d, dict) and "device_id" in d]
    tiers = {str(d["device_id"]): d.get("tier") for d in listed}
    for row in rounds:
        for dev_id, dev in row["devices"].items():
            tiers[dev_id] = tiers.get(dev_id) or dev.get("tier")
    return sorted(((d, str(t) if t else "unknown") for d, t in tiers.items()), key=lambda x: (_tier_key(x[1]), x[0]))


def _finished(row):
    """[(emulated_s, device_id)] of the devices with a recorded emulated time this round."""
    return [(t, d) for d, dev in row["devices"].items() if (t := finite(dev.get("emulated_s"))) is not None]


def _round_emulated(row):
    """The round's emulated time, else its slowest device (the straggler sets the round's pace)."""
    value = finite(row.get("emulated_round_s"))
    return value if value is not None else max(_finished(row), default=(None,))[0]


def _round_bytes(row, key):
    value = finite(row.get(key))
    return value if value is not None else _total(finite(dev.get(key)) for dev in row["devices"].values())


def _not_ok(row):
    return [f"{d} {dev['status']}" for d, dev in row["devices"].items() if dev.get("status") not in (None, "ok")]


def _fmt(value, spec=".2f", scale=1.0, unit=""):
    """A number for a table cell or summary line, or n/a when it is missing."""
    return NA if (value := finite(value)) is None else f"{format(value * scale, spec)}{unit}"


def _pct(value):
    return _fmt(value, ".2f", 100, "%")


def _mb(value):
    return _fmt(value, ".2f", 1e-6, " MB")


def _human_bytes(value):
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _status_counts(rounds):
    """'ok 14, missed 1 (dev3), ...': device-rounds per status, naming the devices that did not finish."""
    counts, who = {}, {}
    for row in rounds:
        for dev_id, dev in row["devices"].items():
            status = str(dev.get("status", "unknown"))
            counts[status] = counts.get(status, 0) + 1
            who.setdefault(status, set()).add(dev_id)
    order = sorted(counts, key=lambda s: (STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER), s))
    return ", ".join(f"{s} {counts[s]}" + ("" if s == "ok" else f" ({' '.join(sorted(who[s]))})") for s in order)


def _summary(fleet, rounds):
    """[(label, value)]: the one set of summary numbers both the CLI and the HTML show."""
    accs = [(a, r["round"]) for r in rounds if (a := finite(r.get("test_accuracy"))) is not None]
    best = max(accs, key=lambda x: x[0], default=None)
    emulated = mean_known(_round_emulated(r) for r in rounds)
    wall = mean_known(finite(r.get("wall_round_s")) for r in rounds)
    times = f"{_fmt(emulated, '.1f', unit=' s')} emulated vs {_fmt(wall, '.1f', unit=' s')} wall"
    if emulated and wall:
        times += f" ({emulated / wall:.1f}x)"
    up, down = (_total(_round_bytes(r, key) for r in rounds) for key in ("bytes_up", "bytes_down"))
    run = ", ".join(str(fleet[k]) for k in ("method", "dataset", "partition") if fleet.get(k))
    settings = ([f"recipe {fleet['recipe']}"] if fleet.get("recipe", "paper") != "paper" else []) \
        + ([f"label counts at epsilon {fleet['label_count_epsilon']:g}"] if fleet.get("label_count_epsilon") else [])
    run += f" ({', '.join(settings)})" if settings else ""
    return [("run", run or NA), ("devices", str(len(_devices(fleet, rounds)))), ("rounds", str(len(rounds))),
            ("final test accuracy", f"{_pct(accs[-1][0])} (round {accs[-1][1]})" if accs else NA),
            ("best test accuracy", f"{_pct(best[0])} (round {best[1]})" if best else NA),
            ("mean round time", times), ("total traffic", f"{_mb(up)} up / {_mb(down)} down"),
            ("device-rounds by status", _status_counts(rounds) or NA), ("served model", fleet.get("served_model", NA))]


def summary_lines(run_dir):
    """The plain-text summary printed at the end of a run (the same numbers as the HTML summary)."""
    fleet, rounds = load_run(run_dir)
    lines = [f"{label}: {value}" for label, value in _summary(fleet, rounds)]
    return lines if rounds else lines[:3] + ["no completed rounds in metrics.jsonl"]


def _empty(ax, title, text):
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=13, color="0.4")
    ax.set_xticks([]), ax.set_yticks([])


def _legend_above(ax, handles, names, title):
    """Legend between the axes and its title (one row, or two when long), so it never covers data."""
    ncol = len(names) if len(names) <= 5 else -(-len(names) // 2)
    ax.legend(handles, names, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=ncol, fontsize=10, frameon=False,
              handlelength=1.8, columnspacing=1.2)
    ax.set_title(title, pad=8 + 20 * -(-len(names) // ncol))


def _round_axis(ax, xs, labels=None):
    if len(xs) <= MAX_LABELLED_ROUNDS:
        ax.set_xticks(xs, labels or [str(x) for x in xs])
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _plot_accuracy(ax, rounds):
    xs = [r["round"] for r in rounds]
    acc = [(x, 100 * a) for x, r in zip(xs, rounds) if (a := finite(r.get("test_accuracy"))) is not None]
    held = [(x, 100 * a) for x, r in zip(xs, rounds) if (a := finite(r.get("device_holdout_accuracy"))) is not None]
    if not acc and not held:
        return _empty(ax, "Accuracy per round", "no accuracy recorded")
    if acc:
        ax.plot(*zip(*acc), "o-", color="#1f77b4", lw=2.2, label="test accuracy (server)")
        bx, by = max(acc, key=lambda p: p[1])
        ax.plot(bx, by, "*", ms=20, color="gold", mec="black", zorder=5, label=f"best: {by:.1f}% (round {bx})")
    if held:
        ax.plot(*zip(*held), "s--", color="#9467bd", lw=1.8, label="mean device held-out accuracy")
    ax.set(title="Accuracy per round", xlabel="round", ylabel="accuracy (%)")
    _round_axis(ax, xs)
    ax.margins(y=0.15)
    ax.legend(loc="best")


def _plot_times(ax, rounds, devices):
    from matplotlib.lines import Line2D

    title, xs = "Emulated time per device per round", [r["round"] for r in rounds]
    round_s = [_round_emulated(r) for r in rounds]
    if all(t is None for t in round_s):
        return _empty(ax, title, "no emulated times recorded")
    ax.bar(xs, [t or 0 for t in round_s], 0.7, color="0.88", zorder=0, label="round (emulated)")
    nth_in_tier = {}
    for dev_id, tier in devices:
        k = nth_in_tier[tier] = nth_in_tier.get(tier, -1) + 1
        ys = [finite(r["devices"].get(dev_id, {}).get("emulated_s")) for r in rounds]
        if all(y is None for y in ys):
            continue
        ax.plot(xs, [float("nan") if y is None else y for y in ys], ls=("-", "--", ":", "-.")[k % 4], marker="o",
                ms=5, color=_colour(tier), lw=1.8, label=tier if k == 0 else None)  # gaps: did not finish
        x_last, y_last = [(x, y) for x, y in zip(xs, ys) if y is not None][-1]
        ax.annotate(dev_id, (x_last, y_last), xytext=(10, 0), textcoords="offset points", va="center",
                    fontsize=10, color=_colour(tier))
    ring = 15 if len(xs) <= MAX_LABELLED_ROUNDS else 9
    for x, row in zip(xs, rounds):
        if _finished(row):
            ax.plot(x, max(_finished(row))[0], "o", ms=ring, mfc="none", mec="black", mew=2, zorder=5)
    labels = [[str(x)] + _not_ok(r)[:3] + ([f"+{len(_not_ok(r)) - 3} more"] if len(_not_ok(r)) > 3 else [])
              for x, r in zip(xs, rounds)]
    _round_axis(ax, xs, ["\n".join(label) for label in labels])
    handles, names = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="", marker="o", ms=12, mfc="none", mec="black", mew=2))
    _legend_above(ax, handles, names + ["straggler"], title)
    ax.margins(x=0.1, y=0.08)
    ax.set(ylabel="emulated time (s)",
           xlabel="round (and devices that did not finish)" if len(xs) <= MAX_LABELLED_ROUNDS else "round")


def _plot_bytes(ax, rounds, devices):
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    title = "Traffic per device, summed over rounds"
    rows = [(dev_id, tier, *(sum(finite(r["devices"].get(dev_id, {}).get(key)) or 0 for r in rounds)
                             for key in ("bytes_up", "bytes_down"))) for dev_id, tier in devices]
    if not any(up or down for _, _, up, down in rows):
        return _empty(ax, title, "no per-device byte counts")
    width = 0.4
    for i, (dev_id, tier, up, down) in enumerate(rows):
        for dx, value, hatch, alpha in ((-width / 2, up, None, 1.0), (width / 2, down, "//", 0.45)):
            ax.bar(i + dx, value, width, color=_colour(tier), alpha=alpha, hatch=hatch, edgecolor=_colour(tier))
            ax.annotate(_human_bytes(value), (i + dx, value), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9, rotation=90 if len(rows) > 6 else 0)
    ax.set_xticks(range(len(rows)), [d for d, *_ in rows], rotation=30 if len(rows) > 6 else 0)
    for label, (_, tier, _, _) in zip(ax.get_xticklabels(), rows):
        label.set_color(_colour(tier))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human_bytes(v)))
    ax.margins(y=0.25 if len(rows) > 6 else 0.15)  # room for the (rotated) value labels
    ax.set(ylabel="bytes", xlabel="device (coloured by tier)")
    tiers = sorted({t for _, t, _, _ in rows}, key=_tier_key)
    handles = [Patch(color="0.3"), Patch(facecolor="0.3", alpha=0.45, hatch="//")]
    handles += [Patch(color=_colour(t)) for t in tiers]
    _legend_above(ax, handles, ["up (device → server)", "down (server → device)"] + tiers, title)


def _usage_by_tier(rounds, devices):
    """{tier: {layer: [tokens per expert]}} summed over the run; falls back to round-level shares as 'all'."""
    def add(acc, values):
        values = values if isinstance(values, list) else []
        acc.extend([0.0] * (len(values) - len(acc)))
        for e, v in enumerate(values):
            acc[e] += max(finite(v) or 0.0, 0.0)

    tier_of, out = dict(devices), {}
    for row in rounds:
        for dev_id, dev in row["devices"].items():
            usage = dev.get("usage") if isinstance(dev.get("usage"), dict) else {}
            for layer, counts in usage.items():
                add(out.setdefault(tier_of.get(dev_id, "unknown"), {}).setdefault(str(layer), []), counts)
    if out:
        return out
    for row in rounds:  # older runs: only the round-level shares, not split by tier
        usage = row.get("usage") if isinstance(row.get("usage"), dict) else {}
        for layer, shares in usage.items():
            add(out.setdefault("all devices", {}).setdefault(str(layer), []), shares)
    return out


def _plot_usage(fig, spec, rounds, devices, n_experts):
    import numpy as np

    usage = _usage_by_tier(rounds, devices)
    if not usage:
        return _empty(fig.add_subplot(spec), "Expert usage per tier", "no expert-usage data")
    tiers = sorted(usage, key=_tier_key)
    layers = sorted({layer for u in usage.values() for layer in u}, key=lambda s: (len(s), s))  # "10" after "9"
    experts = max([n_experts] + [len(v) for u in usage.values() for v in u.values()])
    grids = []
    for tier in tiers:
        grid = np.full((len(layers), experts), np.nan)  # [L, M]; NaN = no tokens seen in that layer
        for i, layer in enumerate(layers):
            counts = np.zeros(experts)  # [M]
            counts[:len(usage[tier].get(layer, []))] = usage[tier].get(layer, [])
            if counts.sum() > 0:
                grid[i] = 100 * counts / counts.sum()  # share of this layer's routed tokens per expert
        grids.append(grid)
    panel = fig.add_subfigure(spec)
    panel.suptitle("Expert usage per tier over the run (each row sums to 100%)", fontsize=13)
    axes = panel.subplots(1, len(tiers), sharey=True, squeeze=False)[0]
    vmax = max([float(np.nanmax(g)) for g in grids if np.isfinite(g).any()], default=100.0)
    for ax, tier, grid in zip(axes, tiers, grids):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(tier, color=_colour(tier), fontsize=12, fontweight="bold")
        ax.set_xticks(range(0, experts, 1 if experts * len(tiers) <= 32 else 2))
        ax.grid(False)
    panel.supxlabel("global expert", fontsize=12)
    axes[0].set_yticks(range(len(layers)), layers)
    axes[0].set_ylabel("adapted layer")
    panel.colorbar(image, ax=list(axes), label="share of the layer's tokens (%)", fraction=0.05, pad=0.02)


def _write_png(path, fleet, rounds):
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the run report needs matplotlib: pip install 'matplotlib>=3.7'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = _devices(fleet, rounds)
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3}):
        fig = plt.figure(figsize=(16, 11), dpi=100, layout="constrained")  # 1600 x 1100 px
        grid = fig.add_gridspec(2, 2)
        title = " · ".join(str(fleet[k]) for k in ("method", "dataset", "partition") if fleet.get(k)) or "fftmoe run"
        fig.suptitle(f"{title} — {len(rounds)} round{'s' * (len(rounds) != 1)}, {len(devices)} devices", fontsize=15)
        if not rounds:
            _empty(fig.add_subplot(grid[:, :]), "", "no completed rounds (metrics.jsonl is empty or missing)")
        else:
            axes = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(3)]
            _plot_accuracy(axes[0], rounds)
            _plot_times(axes[1], rounds, devices)
            _plot_bytes(axes[2], rounds, devices)
            method = str(fleet.get("method") or "fft-moe")
            if method in ("fft-moe", "local", "central"):
                n_experts = int(min(max(finite(fleet.get("experts")) or 0, 0), 1024))  # a corrupt value must not OOM
                _plot_usage(fig, grid[1, 1], rounds, devices, n_experts)
            else:  # a LoRA baseline
                _empty(fig.add_subplot(grid[1, 1]), "Expert usage per tier", f"{method}: LoRA adapters, no experts")
        fig.savefig(path, dpi=100)
        plt.close(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1640px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{width:100%;max-width:1600px}"""


def _round_table(rounds):
    head = ["round", "test acc", "held-out acc", "test loss", "updates / participants", "emulated (s)",
            "wall (s)", "up", "down", "usage entropy", "straggler", "did not finish"]
    rows = [[str(r["round"]), _pct(r.get("test_accuracy")), _pct(r.get("device_holdout_accuracy")),
             _fmt(r.get("test_loss"), ".3f"), f"{_fmt(r.get('updates'), '.0f')} / {_fmt(r.get('participants'), '.0f')}",
             _fmt(_round_emulated(r), ".1f"), _fmt(r.get("wall_round_s"), ".1f"), _mb(_round_bytes(r, "bytes_up")),
             _mb(_round_bytes(r, "bytes_down")), _fmt(r.get("usage_entropy"), ".2f"),
             max(_finished(r), default=(0, NA))[1], ", ".join(_not_ok(r)) or "-"] for r in rounds]
    return head, rows


def _table(head, rows):
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def write_report(run_dir):
    """Write report.png and report.html into run_dir and return their paths; copes with partial runs."""
    run_dir = Path(run_dir)
    fleet, rounds = load_run(run_dir)
    png, page = run_dir / "report.png", run_dir / "report.html"
    _write_png(png, fleet, rounds)
    image = f"<img alt='run report' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"
    title = html.escape(f"fftmoe run report: {run_dir.resolve().name}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>",
             f"<body><h1>{title}</h1><h2>Summary</h2>", _table(["", "value"], _summary(fleet, rounds))]
    if rounds:
        parts += [image, "<h2>Per round</h2>", _table(*_round_table(rounds))]
    else:
        parts += ["<p><strong>No completed rounds</strong> in metrics.jsonl.</p>", image]
    page.write_text("\n".join(parts + ["</body></html>"]), encoding="utf-8")
    return [png, page]


def main(argv=None):
    """`python -m hw_profiles.report RUN_DIR`: regenerate the report.

    Exit codes: 0 written, 1 RUN_DIR missing or matplotlib not installed, 2 bad arguments (argparse).
    """
    parser = argparse.ArgumentParser(prog="python -m hw_profiles.report", description="Regenerate a run's report.")
    parser.add_argument("run_dir", type=Path, help="run folder holding metrics.jsonl and fleet.json")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.run_dir)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(args.run_dir) + [f"report: {p}" for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
