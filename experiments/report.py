"""Report of an experiments run: one markdown table and two PNG plots from ``experiments.json``.

    python -m experiments.report results/experiments-cpu

``experiments/methods_study.py`` calls this at its end; run it by hand to redraw from saved runs.
Every run row carries its per-round ``series`` (rounds with a global evaluation), so quality is
compared two ways:

- at equal rounds: the metric after the last round;
- at equal uplink bytes: the metric at the last evaluated round whose cumulative uplink per
  client is within a budget. Two budgets: what PRISM sent in all its rounds (dense FedAvg has
  not finished one round there, so it shows the untrained network) and what dense FedAvg sent up
  to its first evaluated round (PRISM shows its last evaluated round within that, which may be
  all of them).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {
    "mada": "tab:blue",
    "mean": "tab:orange",
    "dense": "tab:green",
    "mada-change": "tab:red",
    "adam": "tab:purple",
    "beta": "tab:brown",
}
LABELS = {
    "mada": "PRISM (MADA)",
    "mean": "PRISM, plain mean",
    "dense": "dense FedAvg",
    "mada-change": "PRISM, mada-change",
    "adam": "PRISM, server Adam",
    "beta": "PRISM, Beta posterior",
}


def run_series(history: list[dict], metric: str) -> list[dict]:
    """Evaluated rounds of one run: ``{"round", "uplink_mb", "total_mb", "value"}``.

    ``uplink_mb`` is the cumulative uplink per participating client up to and including the round,
    in MB (1e6 bytes): the sum over rounds of ``uplink_bytes / clients``. ``total_mb`` adds the
    downlink per client asked (``downlink_bytes / asked``): traffic both ways. Round 0 has sent nothing.
    """
    out, cum, total = [], 0.0, 0.0
    for rec in sorted(history, key=lambda r: r["round"]):
        if rec["clients"]:
            cum += rec["uplink_bytes"] / rec["clients"] / 1e6
            total += rec["uplink_bytes"] / rec["clients"] / 1e6
        if rec.get("downlink_bytes") and rec.get("asked", rec["clients"]):
            total += rec["downlink_bytes"] / rec.get("asked", rec["clients"]) / 1e6
        if metric in (rec.get("eval") or {}):
            out.append(
                {"round": rec["round"], "uplink_mb": cum, "total_mb": total, "value": rec["eval"][metric]}
            )
    return out


def value_at_budget(series: list[dict], budget_mb: float) -> dict:
    """The last evaluated point whose cumulative uplink is within ``budget_mb`` (round 0 always is)."""
    # Relative slack so that a budget taken from another run's float sum still admits its own round.
    return [p for p in series if p["uplink_mb"] <= budget_mb * (1 + 1e-9)][-1]


def mean_spread(values: list[float]) -> str:
    """``mean ± sample sd`` (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["partitioning"], r["method"]), []).append(r)
    return groups


def _at(group: list[dict], budget_mb: float) -> str:
    points = [value_at_budget(r["series"], budget_mb) for r in group]
    rounds = sorted({p["round"] for p in points})
    return f"{mean_spread([p['value'] for p in points])} (r{'/'.join(map(str, rounds))})"


def table(rows: list[dict], metric: str) -> str:
    """The markdown table: one line per (partitioning, method), mean ± sd over seeds."""
    finals = [r["series"][-1]["uplink_mb"] for r in rows]
    prism_budget = min(finals)
    # Dense FedAvg's first evaluated round after round 0 (round 1 when every round is evaluated).
    dense_budget = min(
        (r["series"][1]["uplink_mb"] for r in rows if r["method"] == "dense" and len(r["series"]) > 1),
        default=None,
    )
    head = [
        f"{metric} after the last round",
        "recall",
        "coverage",
        f"{metric} at {prism_budget:.3g} MB/client uplink",
    ]
    if dense_budget is not None:
        head.append(f"{metric} at {dense_budget:.3g} MB/client uplink")
    head += [
        "mean MADA lambda",
        "uplink B/client/round",
        "bits/weight",
        "downlink B/client/round",
        "model B",
        "wall s",
    ]
    lines = ["| partitioning | method | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for (part, method), group in _groups(rows).items():
        lam = [r["mean_lambda"] for r in group if r["mean_lambda"] is not None]
        cells = [
            mean_spread([r["final"][metric] for r in group]),
            mean_spread([r["final"]["recall"] for r in group]),
            mean_spread([r["final"]["coverage"] for r in group]),
            _at(group, prism_budget),
        ]
        if dense_budget is not None:
            cells.append(_at(group, dense_budget))
        cells += [
            mean_spread(lam) if lam else "-",
            f"{group[0]['uplink_bytes_per_client_round']:.0f}",
            f"{group[0]['uplink_bits_per_weight']:.5f}",
            f"{group[0]['downlink_bytes_per_client_round']:.0f}",
            f"{group[0]['model_bytes']}",
            f"{statistics.mean(r['wall_seconds'] for r in group):.0f}",
        ]
        lines.append(f"| {part} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, x: str, path: Path) -> None:
    """One panel per partitioning; per method the mean over seeds, shaded from min to max.

    ``x = "round"``, ``"uplink_mb"`` or ``"total_mb"`` (up + down): a symlog axis, linear up to PRISM's first round
    and logarithmic beyond, so round 0 (nothing sent, the untrained network) stays on the plot and
    dense FedAvg's 32x larger rounds fit beside PRISM's.
    """
    parts = list(dict.fromkeys(r["partitioning"] for r in rows))
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.6), sharey=True, squeeze=False)
    groups = _groups(rows)
    first_up = min((p[x] for r in rows for p in r["series"] if x != "round" and p[x] > 0), default=1.0)
    for ax, part in zip(axes[0], parts):
        for (p, method), group in groups.items():
            if p != part:
                continue
            # Seeds share the evaluation schedule, so points line up by index.
            points = list(zip(*(r["series"] for r in group)))
            xs = [statistics.mean(pt[x] for pt in pts) for pts in points]
            vals = [[pt["value"] for pt in pts] for pts in points]
            ax.plot(
                xs,
                [statistics.mean(v) for v in vals],
                marker="o",
                ms=3,
                color=COLORS.get(method),
                label=LABELS.get(method, method),
            )
            ax.fill_between(
                xs, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2, color=COLORS.get(method)
            )
        if x != "round":
            ax.set_xscale("symlog", linthresh=first_up)
            ax.set_xlabel(
                f"cumulative {'uplink' if x == 'uplink_mb' else 'traffic up + down'} per client (MB; symlog)"
            )
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
        ax.set_title(part)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (lower is better)" if metric.startswith("FD") else metric)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> dict:
    """Read ``<out>/experiments.json``; write ``experiments.md``, ``quality_vs_rounds.png``,
    ``quality_vs_uplink.png``; return ``{"metric", "table"}``."""
    doc = json.loads((out / "experiments.json").read_text())
    rows, metric = doc["rows"], doc["metric"]
    text = table(rows, metric)
    settings = ", ".join(f"{k} {v}" for k, v in doc["settings"].items())
    (out / "experiments.md").write_text(
        f"# Experiments: {settings}\n\nMean ± sd over seeds {doc['seeds']}; (rN) = the round the value is from. "
        f"Measured on {doc['machine']}; the runs took {doc['total_wall_seconds'] / 60:.1f} min in all.\n\n"
        f"{text}\n![quality vs rounds](quality_vs_rounds.png)\n\n![quality vs uplink](quality_vs_uplink.png)\n\n"
        f"![quality vs traffic both ways](quality_vs_traffic.png)\n"
    )
    plot(rows, metric, "round", out / "quality_vs_rounds.png")
    plot(rows, metric, "uplink_mb", out / "quality_vs_uplink.png")
    plot(rows, metric, "total_mb", out / "quality_vs_traffic.png")
    return {"metric": metric, "table": text}


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]))["table"])
