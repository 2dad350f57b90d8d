"""The tables, JSON summary and plot of `fftmoe bench accuracy`, from finished cells' summaries.

Pure functions over the cell records `bench_accuracy.summarise_run` writes: mean and spread over seeds
per (partition, method), robustness (Dirichlet 0.1 as a share of IID), the ablation deltas, the Markdown
and the accuracy-per-round plot. It runs nothing and reads no run folders.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

from hw_profiles.report import mean_known

METHODS = ("fft-moe", "fedit", "hetlora", "flexlora", "local", "central")
REFERENCES = ("local", "central")
ABLATIONS = {"no-het": ["--lambda-het", "0"], "no-bal": ["--lambda-bal", "0"],
             "activation": ["--weighting", "activation"], "personal-router": ["--personalise-router"],
             "router-lr0": ["--router-lr", "0"],
             "personal-router-avg": ["--personalise-router", "--serve-averaged-router"],
             "fedadam": ["--server-optimizer", "fedadam", "--server-lr", "0.03"],
             "coverage-slots": ["--slot-keep", "0"],
             "coverage-personal": ["--slot-keep", "0", "--personalise-router"],
             "logit-prior": ["--logit-prior", "1"],
             "label-skew": ["--logit-prior", "1", "--own-labels-only"],
             "own-labels": ["--own-labels-only"],
             "label-skew-tau0.5": ["--logit-prior", "0.5", "--own-labels-only"],
             "fedit-label-skew": ["--logit-prior", "1", "--own-labels-only"],
             "label-head": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels"],
             "fedit-label-head": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels"],
             "label-head-coverage": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels",
                                     "--slot-keep", "0"],
             "label-head-personal": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels",
                                     "--personalise-router"],
             "label-head-router0": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels",
                                    "--router-lr", "0"],
             "label-head-router0.5": ["--logit-prior", "1", "--own-labels-only", "--head-weighting", "labels",
                                      "--router-lr", "0.5"],
             "label-aware-dp1": ["--recipe", "label-aware", "--label-count-epsilon", "1"]}
# the method an ablation varies, where it is not fft-moe
ABLATION_METHOD = {"fedit-label-skew": "fedit", "fedit-label-head": "fedit"}
_DIR = re.compile(r"^dir(\d+(?:\.\d*)?|\.\d+)$")  # dir0.5: Dirichlet(0.5)


ABLATION_TEXT = {"no-het": "lambda_het = 0", "no-bal": "lambda_bal = 0",
                 "activation": "aggregation weights: activation", "personal-router": "router rows kept on the device",
                 "router-lr0": "global router rows not averaged (server router step 0)",
                 "personal-router-avg": "router rows kept on the device; the served model averages them",
                 "fedadam": "server optimiser FedAdam (eta 0.03, tau 1e-3)",
                 "coverage-slots": "no expert kept across rounds: all slots to the least-used experts",
                 "coverage-personal": "coverage-slots and router rows kept on the device",
                 "logit-prior": "devices train with their label prior in the logits (balanced softmax, tau 1)",
                 "label-skew": "logit-prior, and devices update only the head rows of labels they hold",
                 "own-labels": "devices update only the head rows of labels they hold (no prior)",
                 "label-skew-tau0.5": "label-skew with half the prior (tau 0.5)",
                 "fedit-label-skew": "FedIT with label-skew's device training (not a published baseline)",
                 "label-head": "label-skew, and head row y averaged by the devices' samples of label y",
                 "fedit-label-head": "FedIT with label-head's device training and head rows (not a published baseline)",
                 "label-head-coverage": "label-head and coverage-slots",
                 "label-head-personal": "label-head and router rows kept on the device",
                 "label-head-router0": "label-head and the global router rows not averaged (server router step 0)",
                 "label-head-router0.5": "label-head and half a server step on the router rows (router lr 0.5)",
                 "label-aware-dp1": "the label-aware recipe (label-head-router0) with label counts sent as one "
                                    "epsilon = 1 private release"}


def _order(partition: str, name: str) -> tuple:
    alpha = float(partition[3:]) if _DIR.match(partition) else math.inf  # iid first, then decreasing alpha
    names = METHODS + tuple(ABLATIONS)
    return (-alpha, partition, names.index(name) if name in names else len(names), name)


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (partition, method or ablation): means over seeds, sample std of the final accuracy
    when there are several seeds, and the per-round curve (mean, min, max over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["partition"], cell["name"]), []).append(cell)
    rows = []
    for (partition, name), group in sorted(groups.items(), key=lambda kv: _order(*kv[0])):
        group.sort(key=lambda c: c["seed"])
        finals = [c["final_test_accuracy"] for c in group]
        curve = []
        for r in sorted({p["round"] for c in group for p in c["curve"]}):
            values = [p["test_accuracy"] for c in group for p in c["curve"]
                      if p["round"] == r and p["test_accuracy"] is not None]
            if values:
                curve.append({"round": r, "mean": mean_known(values), "min": min(values), "max": max(values)})
        row = {"partition": partition, "name": name, "kind": group[0].get("kind", "method"),
               "seeds": [c["seed"] for c in group], "final_mean": mean_known(finals),
               "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
               "final_min": min(finals), "final_max": max(finals), "curve": curve,
               "final_by_seed": {str(c["seed"]): c["final_test_accuracy"] for c in group}}
        for key in ("best_test_accuracy", "holdout_accuracy", "bytes_up_per_device_round",
                    "bytes_down_per_device_round", "emulated_round_s", "usage_entropy"):
            row[key] = mean_known(c.get(key) for c in group)
        rows.append(row)
    return rows


def robustness(rows: list[dict]) -> dict[str, dict[str, float]]:
    """method -> {non-IID partition: its mean final test accuracy as a % of the method's IID one}."""
    iid = {r["name"]: r["final_mean"] for r in rows if r["partition"] == "iid" and r["kind"] == "method"}
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["partition"] != "iid" and r["kind"] == "method" and iid.get(r["name"]):
            out.setdefault(r["name"], {})[r["partition"]] = 100.0 * r["final_mean"] / iid[r["name"]]
    return out


def summary(cells: list[dict], settings: dict, failed: list[dict], pending: int) -> dict:
    rows = aggregate(cells)
    return {"settings": settings, "finished": len(cells), "pending": pending, "failed": failed,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "robustness": robustness(rows),
            "cells": sorted(cells, key=lambda c: (*_order(c["partition"], c["name"]), c["seed"]))}


def _pct(mean, std=None) -> str:
    return "n/a" if mean is None else f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _bytes(value) -> str:
    unit, scale = next(((u, k) for u, k in (("MB", 1e6), ("kB", 1e3)) if (value or 0) >= k), ("B", 1))
    return "n/a" if value is None else f"{value / scale:.3g} {unit}" if scale > 1 else f"{value:.0f} B"


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table, the first `left` columns left-aligned and the numbers right-aligned."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _paired_delta(row: dict, base: dict) -> str:
    """Mean final-accuracy difference to `base` over the seeds both ran (seeds differ in partition, init
    and dropouts, so comparing a one-seed variant with a three-seed mean would mostly measure the seed)."""
    shared = sorted(set(row["final_by_seed"]) & set(base["final_by_seed"]))
    if not shared:
        return "n/a (no shared seed)"
    diffs = [row["final_by_seed"][k] - base["final_by_seed"][k] for k in shared]
    return f"{100 * sum(diffs) / len(diffs):+.1f}"


def varied_method(ablation: str) -> str:
    """The method an ablation varies (it runs with that method and is compared with it)."""
    return ABLATION_METHOD.get(ablation, "fft-moe")


def _ablation_delta(row: dict, rows: list[dict], partition: str) -> str:
    method = varied_method(row["name"])
    base = next((r for r in rows if r["partition"] == partition and r["name"] == method), None)
    return _paired_delta(row, base) + ("" if method == "fft-moe" else f" vs {method}") if base else "n/a"


def render_markdown(result: dict) -> str:
    s, rows = result["settings"], result["rows"]
    lines = ["# fftmoe bench accuracy", "",
             f"Dataset {s.get('dataset') or 'bbcnews (default)'}, "
             f"model {s.get('model') or 'all-MiniLM-L6-v2 (default)'}, "
             f"fleet {s.get('fleet')}, {s.get('rounds')} rounds x {s.get('local_steps')} local steps. "
             f"{result['finished']} cells finished, {result['pending']} pending, {len(result['failed'])} failed "
             f"(updated {result['updated']}).", "",
             "Accuracy in %: mean over seeds, ± the sample standard deviation when there are several. Held-out: "
             "the devices' accuracy on their own held-out split (last round, sample-weighted). Bytes per device per "
             "round: mean over rounds of the round's total over the devices that uploaded (up) or were sent a task "
             "(down). Emulated time: mean per round. Usage "
             "entropy: nats, last round (n/a for LoRA methods).", ""]
    head = ["method", "seeds", "final test acc", "best test acc", "held-out acc", "up / device / round",
            "down / device / round", "emulated round (s)", "usage entropy"]
    for partition in dict.fromkeys(r["partition"] for r in rows if r["kind"] == "method"):
        lines += [f"## {partition}", ""] + _table(head, [
            [r["name"], ",".join(map(str, r["seeds"])), _pct(r["final_mean"], r["final_std"]),
             _pct(r["best_test_accuracy"]), _pct(r["holdout_accuracy"]), _bytes(r["bytes_up_per_device_round"]),
             _bytes(r["bytes_down_per_device_round"]),
             "n/a" if r["emulated_round_s"] is None else f"{r['emulated_round_s']:.1f}",
             "n/a" if r["usage_entropy"] is None else f"{r['usage_entropy']:.2f}"]
            for r in rows if r["partition"] == partition and r["kind"] == "method"])
    partitions = sorted({p for v in result["robustness"].values() for p in v}, key=lambda p: _order(p, ""))
    if partitions:
        lines += ["## Robustness: final test accuracy as % of IID", ""] + _table(
            ["method"] + partitions, [[name] + [f"{v[p]:.1f}%" if p in v else "n/a" for p in partitions]
                                      for name, v in result["robustness"].items()])
    for partition in dict.fromkeys(r["partition"] for r in rows if r["kind"] == "ablation"):
        base = next((r for r in rows if r["partition"] == partition and r["name"] == "fft-moe"), None)
        variants = [base] if base else []
        variants += [r for r in rows if r["partition"] == partition and r["kind"] == "ablation"]
        lines += [f"## Ablations (FFT-MoE at {partition})", ""] + _table(
            ["variant", "what changes", "seeds", "final test acc", "best test acc", "held-out acc",
             "final vs the method it varies (fft-moe unless named), same seeds (pp)"],
            [[r["name"], ABLATION_TEXT.get(r["name"], "none: both losses, samples weights, shared router"),
              ",".join(map(str, r["seeds"])), _pct(r["final_mean"], r["final_std"]), _pct(r["best_test_accuracy"]),
              _pct(r["holdout_accuracy"]), _ablation_delta(r, rows, partition) if r is not base else "-"]
             for r in variants], left=2)
    if result["failed"]:
        lines += ["## Failed cells (run the bench again to retry them)", ""]
        lines += [f"- {f.get('cell')}: {f.get('error')} (log: {f.get('log')})" for f in result["failed"]] + [""]
    return "\n".join(lines)


def write_plot(path: Path, result: dict) -> None:
    """Test accuracy per round per method, one panel per partition (mean over seeds, min-max shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["kind"] == "method" and r["curve"]]
    partitions = list(dict.fromkeys(r["partition"] for r in rows)) or ["(no finished cells)"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3}):
        fig, axes = plt.subplots(1, len(partitions), figsize=(1 + 5.5 * len(partitions), 5.5), sharey=True,
                                 squeeze=False, layout="constrained")
        for ax, partition in zip(axes[0], partitions):
            for r in (r for r in rows if r["partition"] == partition):
                xs = [p["round"] for p in r["curve"]]
                ax.plot(xs, [100 * p["mean"] for p in r["curve"]], marker="o", lw=2, color=colours[r["name"]],
                        ls={"local": ":", "central": "--"}.get(r["name"], "-"), label=r["name"])
                if len(r["seeds"]) > 1:
                    ax.fill_between(xs, [100 * p["min"] for p in r["curve"]], [100 * p["max"] for p in r["curve"]],
                                    color=colours[r["name"]], alpha=0.18, lw=0)
            ax.set(title=partition, xlabel="round")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0][0].set_ylabel("test accuracy (%)")
        handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 6),
                       frameon=False)
        fig.suptitle("Test accuracy per round (mean over seeds; shaded: min to max)")
        fig.savefig(path, dpi=100)
        plt.close(fig)
