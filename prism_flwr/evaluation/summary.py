"""The closing summary printed at the end of a run: where the outputs are, what was learned, what it cost.

``closing_summary(history, out, summary)`` is pure: it reads nothing from disk. ``history`` is the
list of round records (as in ``history.json``: ``round``, ``eval`` on evaluation rounds,
``uplink_bytes``, ``downlink_bytes``, ...), ``summary`` the dict the ServerApp writes to
``summary.json`` (``method``, ``rounds``, ``wall_seconds``, ``model_bytes``,
``dense_float32_bytes``, ``density``, ``masked_weights``, ``final_eval``, ...). Missing pieces
(no evaluation, no traffic) are left out of the text rather than shown as zeros.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Metrics where a smaller value is better; every other reported metric is better larger.
LOWER_IS_BETTER_PREFIXES = ("FD-", "FID", "mmd")
METRIC_ORDER = ("precision", "recall", "density", "coverage")


def human_bytes(n: float) -> str:
    """1,234 -> '1.2 kB' (powers of 1000, as elsewhere in the project's reports)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _ordered_metrics(metrics: Mapping[str, float]) -> list[str]:
    """The quality metric (FD/FID) first, then precision ... coverage, then the rest."""
    first = [k for k in metrics if k.startswith(("FD-", "FID"))]
    known = [k for k in METRIC_ORDER if k in metrics]
    return first + known + [k for k in metrics if k not in first and k not in known]


def _better(name: str) -> str:
    return "lower is better" if name.startswith(LOWER_IS_BETTER_PREFIXES) else "higher is better"


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"


def metrics_table(
    first: Mapping[str, Any], last: Mapping[str, Any], first_round: int, last_round: int
) -> list[str]:
    """Lines 'name  start -> end  (lower/higher is better)' for every metric in either record."""
    names = _ordered_metrics({**first, **last})
    width = max(len(n) for n in names)
    head = f"  {'metric':<{width}}  {'round ' + str(first_round):>10}  {'round ' + str(last_round):>10}"
    rows = [
        f"  {n:<{width}}  {_fmt(first.get(n, '-')):>10}  {_fmt(last.get(n, '-')):>10}  ({_better(n)})"
        for n in names
    ]
    return [head, *rows]


def closing_summary(history: Sequence[Mapping[str, Any]], out: str | Path, summary: Mapping[str, Any]) -> str:
    """The text to print once at the end of a run (see the module docstring)."""
    out = Path(out)
    dense = summary.get("method") == "dense"
    rounds = summary.get("rounds", max((r.get("round", 0) for r in history), default=0))
    model_file = out / ("model-dense.pt" if dense else "model.prism")
    lines = [
        f"PRISM run finished: {rounds} rounds"
        + (f" in {human_seconds(summary['wall_seconds'])}" if "wall_seconds" in summary else "")
        + f". Outputs in {out}:"
    ]

    size = summary.get("model_bytes")
    dense_size = summary.get("dense_float32_bytes")
    what = "the dense baseline's float32 weights" if dense else "the exported model: frozen seed + 1-bit mask"
    if size:
        what += f", {human_bytes(size)}"
        if dense_size and not dense:
            what += f" (dense float32: {human_bytes(dense_size)}, {dense_size / size:.0f}x larger)"
    files = [
        (model_file.name, what),
        ("samples.png", "64 samples of the exported model"),
        ("history.json", "one record per round; history.png: the metrics against rounds"),
        ("summary.json", "final metrics, sizes, traffic"),
    ]
    evaluated = [r for r in history if r.get("eval")]
    if evaluated:
        files.append(("samples/", f"a 64-sample grid at each of the {len(evaluated)} evaluations"))
    files.append(
        ("checkpoint-*.ckpt", "server state after each of the last rounds (resume = true continues)")
    )
    width = max(len(f) for f, _ in files)
    lines += [f"  {f:<{width}}  {w}" for f, w in files]

    if evaluated:
        first, last = evaluated[0], evaluated[-1]
        label = " (untrained)" if first.get("round") == 0 else ""
        lines.append(f"Quality, round {first.get('round')}{label} -> round {last.get('round')}:")
        lines += metrics_table(first["eval"], last["eval"], first.get("round", 0), last.get("round", 0))
    else:
        lines.append("Quality: no evaluation recorded.")

    up = sum(int(r.get("uplink_bytes") or 0) for r in history)
    down = sum(int(r.get("downlink_bytes") or 0) for r in history)
    if up or down:
        traffic = f"Traffic: {human_bytes(up)} up, {human_bytes(down)} down in total"
        bpw = [r["uplink_bits_per_weight"] for r in history if r.get("uplink_bits_per_weight")]
        if bpw:
            traffic += f" ({bpw[-1]:.5f} bits per weight up)"
        lines.append(traffic + ".")
    if summary.get("dp") not in (None, "off"):
        eps = summary.get("dp_epsilon_per_client") or {}
        values = list(eps.values()) if isinstance(eps, Mapping) else list(eps)
        spent = max(values) if values else None
        lines.append(
            f"Privacy: dp = {summary['dp']}"
            + (f", largest epsilon spent by a client {spent:.3g}" if spent else "")
        )

    if dense:
        lines.append(
            f"The dense baseline's weights are in {model_file} (prism-flwr sample reads .prism files only)."
        )
    else:
        lines.append("Draw samples from the exported model:")
        lines.append(f"  prism-flwr sample {shlex.quote(str(model_file))} --n 64 --out grid.png")
    return "\n".join(lines)
