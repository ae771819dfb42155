"""Markdown tables from ``bytes_experiment.py`` runs: bits per weight per round, and quality.

python -m experiments.bytes_report [--dir results/bytes]   # writes <dir>/bytes.md, prints it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def per_round(run: dict) -> list[str]:
    lines = [
        "| round | H(theta) client | up coded | up ideal | down full | down delta | up + down (delta) | "
        "dense / PRISM | lambda | FD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run["rounds"]:
        total = r["coded_bits_mean"] + r["downlink_delta_bits"]
        fd = r.get("eval", {}).get(run["metric"])
        lines.append(
            f"| {r['round']} | {r['theta_entropy_bits_mean']:.3f} | {r['coded_bits_mean']:.3f} | "
            f"{r['ideal_bits_mean']:.3f} | {r['downlink_bits']:.2f} | {r['downlink_delta_bits']:.2f} | "
            f"{total:.2f} | {64 / total:.1f}x | {r['mada_lambda']:.3f} | {'' if fd is None else f'{fd:.1f}'} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("results/bytes"))
    args = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(args.dir.glob("bytes-*.json"))}
    out = [
        "# Bytes both ways, measured on real training",
        "",
        "Written by `experiments/bytes_report.py` from `experiments/bytes_experiment.py` runs (bits per weight "
        "per client per round; dense FedAvg moves 64).",
        "",
    ]
    for name, run in runs.items():
        if run["mode"] != "grid8":
            continue
        out += [
            f"## {name}: ngf {run['ngf']} ({run['weights']:,} weights), {run['clients']} clients, "
            f"{run['steps']} local steps, seed {run['seed']}, {run['machine']}, {run['wall_s']:.0f} s",
            "",
        ]
        out += per_round(run) + [""]
    seeds = sorted({r["seed"] for r in runs.values() if r["ngf"] == 8})
    modes = [
        m
        for m in ("float32", "grid8", "jitter")
        if any(r["mode"] == m and r["ngf"] == 8 for r in runs.values())
    ]
    if seeds and modes:
        out += [
            f"## Quality, ngf 8: {runs[next(iter(runs))]['metric']} after the last round, same seeds",
            "",
            "| broadcast | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
            "|---" * (len(seeds) + 2) + "|",
        ]
        for m in modes:
            vals = [
                runs.get(f"bytes-{m}-ngf8-seed{s}", {}).get("rounds", [{}])[-1].get("eval", {}) for s in seeds
            ]
            fds = [v.get(runs[next(iter(runs))]["metric"]) for v in vals]
            ok = [f for f in fds if f is not None]
            out.append(
                f"| {m} | "
                + " | ".join("-" if f is None else f"{f:.1f}" for f in fds)
                + f" | {sum(ok) / len(ok):.1f} |"
            )
        out.append("")
    text = "\n".join(out)
    (args.dir / "bytes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
