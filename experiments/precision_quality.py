"""Quality at a fixed number of steps: the bf16 step against float32, side by side, seed by seed.

    python -m experiments.precision_quality [--seeds 30 31 32] [--rounds 2] [--steps 50]

For each seed the in-process runner (``inprocess.run``: the ClientApp's round and the strategy's
aggregation in one process) trains the default run's shape (4 clients, the run-config defaults,
``--rounds`` x ``--steps``) twice, ``precision = "bf16"`` then ``"float32"``, one thread; the
server's ``Evaluator`` scores the global model after the last round (FD-FMNIST-CNN, precision,
recall, density, coverage on ``--eval-samples`` samples). Both runs of a seed share network,
partition and random streams, the clients' mask secrets included (``insecure_test_mask_seed`` =
the seed), so the pair differs only in the generator's arithmetic. Writes
``<out>/precision-quality-<rounds>x<steps>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from prism_flwr.config import RunConfig
from prism_flwr.evaluation.evaluator import Evaluator
from prism_flwr.federated import inprocess
from prism_flwr.model.precision import cpu_has_bf16
from prism_flwr.threads import configure_threads

CLIENTS = 4
PRECISIONS = ("bf16", "float32")
METRICS = ("precision", "recall", "density", "coverage")


def one(seed: int, prec: str, args, evaluator: Evaluator) -> dict:
    cfg = RunConfig.parse(
        {
            "seed": seed,
            "precision": prec,
            "num-server-rounds": args.rounds,
            "local-steps": args.steps,
            "eval-every": args.rounds,
            "device": "cpu",
        }
    )
    t0 = time.perf_counter()
    history = inprocess.run(cfg, CLIENTS, evaluator=evaluator, insecure_test_mask_seed=seed)
    return {
        "seed": seed,
        "precision": prec,
        "eval": history[-1]["eval"],
        "client_seconds": sum(r.get("client_seconds", 0.0) for r in history),
        "wall_seconds": time.perf_counter() - t0,
    }


def report(rows: list[dict], args, metric: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = [
        f"# bf16 vs float32 step: quality after {args.rounds} rounds x {args.steps} local steps",
        "",
        f"{CLIENTS} clients, the run-config defaults otherwise (ngf 16, batch 64, pixel MMD, plain mean), "
        f"{args.eval_samples} evaluation samples, one thread on the busy 2-core CPU "
        f"({time.strftime('%Y-%m-%d')}, commit {commit.strip()}). Same seed: same network, partition and "
        "random streams (the mask secrets included).",
        "",
        f"| seed | {metric} bf16 | {metric} float32 | bf16 - float32 | recall bf16 / float32 | "
        "client time bf16 / float32 |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["seed"], r["precision"]): r for r in rows}
    diffs = []
    for seed in args.seeds:
        b, f = by.get((seed, "bf16")), by.get((seed, "float32"))
        if b is None or f is None:
            continue
        diffs.append(b["eval"][metric] - f["eval"][metric])
        lines.append(
            f"| {seed} | {b['eval'][metric]:.1f} | {f['eval'][metric]:.1f} | {diffs[-1]:+.1f} | "
            f"{b['eval']['recall']:.3f} / {f['eval']['recall']:.3f} | "
            f"{b['client_seconds'] / f['client_seconds']:.2f} |"
        )
    if len(diffs) > 1:
        lines += [
            "",
            f"Mean difference {statistics.mean(diffs):+.1f} (sd {statistics.stdev(diffs):.1f}) over "
            f"{len(diffs)} seeds.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--out", default="results/cpu")
    args = ap.parse_args()
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16 / AMX): nothing to compare")
    configure_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, name = [], f"precision-quality-{args.rounds}x{args.steps}"
    defaults = RunConfig.parse({})
    for seed in args.seeds:
        evaluator = Evaluator(defaults.dataset, defaults.resolved_data_dir(), args.eval_samples, seed, "cpu")
        for prec in PRECISIONS:
            rows.append(one(seed, prec, args, evaluator))
            print(json.dumps(rows[-1]), flush=True)
            (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
        (out / f"{name}.md").write_text(report(rows, args, evaluator.metric_name))
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
