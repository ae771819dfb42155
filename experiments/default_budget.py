"""The default run's steps and rounds: the same local steps per client, cut into rounds four ways.

    python -m experiments.default_budget --out results/default-run/budget [--steps 100 200 300 400]
    python -m experiments.default_budget --out results/default-run/budget --report-only

A default run's wall time is its start-up plus, per round, the clients' local steps and the
round's fixed cost (evaluation, Flower's messages). So at a fixed wall time the choice is how to
cut a budget of local steps per client into rounds: more steps per round pay the fixed cost
fewer times. For each ``--steps`` S the in-process runner (``experiments.aggregation_study``: the
ClientApp's round and the strategy's step in one process, the default run's shape: 4 clients,
label shards, ngf 16, the run-config defaults) trains ``ceil(--budget / S)`` rounds of S steps per
seed, evaluating FD-FMNIST-CNN and recall every round on 1000 samples. The report gives, for every
(S, rounds), the mean ± sd over seeds, so the candidates that fit the wall time (measured with
``./run.sh`` on the machine, see results/default-run/README.md) compare at equal steps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from experiments import aggregation_study

METRICS = ("FD-FMNIST-CNN", "recall")


def run(out: Path, steps: list[int], seeds: list[int], budget: int) -> None:
    for s in steps:
        aggregation_study.run_grid(
            argparse.Namespace(
                size="small",
                rules=["mean"],
                seeds=seeds,
                partitionings=["shards"],
                shard="0/1",
                overrides={
                    "local-steps": s,
                    "num-server-rounds": math.ceil(budget / s),
                    "eval-every": 1,
                    "eval-samples": 1000,
                },
                deadline_min=None,
                run_deadline_min=None,
                samples=True,
                verbose=True,
            ),
            out / f"steps-{s}",
        )


def _cell(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out: Path) -> str:
    """``<out>/budget.md``: one row per (steps per round, rounds), metrics mean ± sd over seeds."""
    rows, seeds = [], set()
    for folder in sorted(out.glob("steps-*"), key=lambda p: int(p.name.split("-")[1])):
        runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
        if not runs:
            continue
        steps = runs[0]["config"]["local-steps"]
        seeds |= {r["seed"] for r in runs}
        for rnd in range(1, max(len(r["history"]) for r in runs)):
            evals = [r["history"][rnd]["eval"] for r in runs if len(r["history"]) > rnd]
            rows.append(
                f"| {steps} | {rnd} | {steps * rnd} | {len(evals)} | "
                + " | ".join(_cell([e[m] for e in evals], 1 if m.startswith("FD") else 3) for m in METRICS)
                + " |"
            )
    table = "\n".join(
        [
            f"Seeds {sorted(seeds)}; mean ± sd over the seeds that reached the round.",
            "",
            "| steps per round | rounds | steps per client | seeds | " + " | ".join(METRICS) + " |",
            "|---|---|---|---|" + "---|" * len(METRICS),
            *rows,
        ]
    )
    (out / "budget.md").write_text(table + "\n")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", nargs="+", type=int, default=[100, 200, 300, 400])
    p.add_argument("--seeds", nargs="+", type=int, default=[30, 31, 32])
    p.add_argument("--budget", type=int, default=1200, help="local steps per client in the longest run")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if not args.report_only:
        run(args.out, args.steps, args.seeds, args.budget)
    table = report(args.out)
    print(table)
    print(json.dumps({"bench": "default_budget", "out": str(args.out)}))


if __name__ == "__main__":
    main()
