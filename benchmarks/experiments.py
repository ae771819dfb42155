"""PRISM (MADA) vs PRISM without MADA (plain mean) vs dense FedAvg, IID and non-IID, over seeds.

    python benchmarks/experiments.py [--seeds 30 31 32] [--rounds 8] [--steps 15] [--ngf 16]
                                     [--methods mada mean dense] [--out results/experiments]

Every run is a real ``flwr run``. Writes ``<out>/experiments.md`` (mean and spread over seeds of
the final quality, uplink per round per client, mean MADA lambda, wall time) and
``<out>/experiments.json``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from runner import run_app

METHODS = {"mada": {"aggregation": "mada"}, "mean": {"aggregation": "mean"}, "dense": {"method": "dense"}}
PARTITIONINGS = (("iid", {}), ("shards", {}), ("dirichlet", {"dirichlet-alpha": 0.1}))


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--partitionings", nargs="+", default=[p for p, _ in PARTITIONINGS])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path("results/experiments"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for part, extra in (p for p in PARTITIONINGS if p[0] in args.partitionings):
        for method in args.methods:
            for seed in args.seeds:
                tag = f"{part}-{method}-seed{seed}"
                cfg = {**METHODS[method], "partitioning": part, "seed": seed, "num-server-rounds": args.rounds,
                       "local-steps": args.steps, "ngf": args.ngf, "eval-every": args.rounds,
                       "min-train-nodes": args.nodes, **extra}
                res = run_app(cfg, args.out / tag, nodes=args.nodes, log=args.out / f"{tag}.log")
                rounds = [r for r in res["history"] if r["round"] >= 1]
                lambdas = [r["mada_lambda"] for r in rounds if r["mada_lambda"] is not None]
                rows.append({"partitioning": part, "method": method, "seed": seed, **res["summary"]["final_eval"],
                             "uplink_bytes_per_client_round": rounds[-1]["uplink_bytes"] / rounds[-1]["clients"],
                             "uplink_bits_per_weight": rounds[-1]["uplink_bits_per_weight"],
                             "mean_lambda": statistics.mean(lambdas) if lambdas else None,
                             "wall_seconds": res["wall_seconds"]})
                print(json.dumps(rows[-1]), flush=True)

    metric = next(k for k in rows[0] if k.startswith("FD") or k == "FID")
    lines = [f"| partitioning | method | {metric} | recall | coverage | mean lambda | uplink B/client/round | bits/weight | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part in dict.fromkeys(r["partitioning"] for r in rows):
        for method in args.methods:
            group = [r for r in rows if r["partitioning"] == part and r["method"] == method]
            lam = [r["mean_lambda"] for r in group if r["mean_lambda"] is not None]
            lines.append(f"| {part} | {method} | {_mean_spread([r[metric] for r in group])} | "
                         f"{_mean_spread([r['recall'] for r in group])} | {_mean_spread([r['coverage'] for r in group])} | "
                         f"{_mean_spread(lam) if lam else '-'} | {group[0]['uplink_bytes_per_client_round']:.0f} | "
                         f"{group[0]['uplink_bits_per_weight']:.5f} | {statistics.mean(r['wall_seconds'] for r in group):.0f} |")
    (args.out / "experiments.md").write_text("\n".join(lines) + "\n")
    (args.out / "experiments.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"bench": "experiments", "seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
