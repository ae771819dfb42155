"""Training curves of a run as one PNG (matplotlib, Agg backend: no display needed).

``plot_history`` reads the ServerApp's history records (``round``, ``uplink_bytes`` and, on
evaluation rounds, ``eval``) and draws three panels against the round: the Fréchet distance
(whatever its name), precision / recall / density / coverage, and the cumulative uplink in
megabytes (10^6 bytes) summed over clients.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: the server has no display
import matplotlib.pyplot as plt  # noqa: E402

PRDC = ("precision", "recall", "density", "coverage")


def _fd_name(history: list[dict]) -> str | None:
    """The Fréchet-distance key of the eval records: "FID" or "FD-..."."""
    for record in history:
        for key in record.get("eval", {}):
            if key == "FID" or key.startswith("FD-"):
                return key
    return None


def plot_history(history: list[dict], out_png: str | Path) -> Path:
    """Write the three-panel plot of ``history`` to ``out_png``; returns its path."""
    rounds = [r["round"] for r in history]
    uplink_mb, total = [], 0
    for r in history:
        total += r.get("uplink_bytes") or 0
        uplink_mb.append(total / 1e6)
    evals = [r for r in history if r.get("eval")]
    fd = _fd_name(history)

    fig, (ax_fd, ax_prdc, ax_up) = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    if fd is not None:
        ax_fd.plot(
            [r["round"] for r in evals if fd in r["eval"]],
            [r["eval"][fd] for r in evals if fd in r["eval"]],
            "o-",
        )
    ax_fd.set_ylabel(f"{fd or 'Fréchet distance'} (lower is better)")
    for name in PRDC:
        points = [(r["round"], r["eval"][name]) for r in evals if name in r["eval"]]
        if points:
            ax_prdc.plot(*zip(*points), "o-", label=name)
    if ax_prdc.lines:
        ax_prdc.legend(loc="best")
    ax_prdc.set_ylabel("k-NN metrics (k = 5)")
    ax_up.plot(rounds, uplink_mb, "-")
    ax_up.set_ylabel("cumulative uplink (MB)")
    ax_up.set_xlabel("round")
    for ax in (ax_fd, ax_prdc, ax_up):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
