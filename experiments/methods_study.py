"""PRISM (MADA) vs PRISM without MADA (plain mean) vs dense FedAvg, IID and non-IID, over seeds.

    python -m experiments.methods_study --size cpu      # 27 runs: 19.4 min measured on 2 CPU cores
    python -m experiments.methods_study --size cpu-long --partitionings iid dirichlet
    python -m experiments.methods_study --size gpu      # paper-width generator, one GPU
    python -m experiments.methods_study --size cpu --seeds 30 --partitionings iid --rounds 3  # overrides

Every run is a real ``flwr run`` of this app with 10 simulated clients, one seed list for all
methods, and the same rounds and local steps. Run folders go to ``<out>/runs/``; the report
(``experiments.md``, ``quality_vs_rounds.png``, ``quality_vs_uplink.png``, ``experiments.json``)
to ``<out>`` (see ``report.py``). Prints one JSON line with every run's figures. A run whose
``runs/<tag>.json`` exists with the same run config is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from experiments.report import run_series, write_report
from experiments.runner import run_app

METHODS = {"mada": {"aggregation": "mada"}, "mean": {"aggregation": "mean"}, "dense": {"method": "dense"}}
PARTITIONINGS = {"iid": {}, "shards": {}, "dirichlet": {"dirichlet-alpha": 0.1}}
# Run-config keys per size (measured figures: docs/aggregation.md):
# - cpu: the whole grid (27 runs) in under 20 min on 2 cores; a run is ~43 s, of which ~30 s is
#   Flower/Ray start-up, the first round's worker start and the final export, so rounds are few.
# - cpu-long: 24 rounds, where MADA's slower start could pay off (~2 min a run on 2 cores).
# - gpu: the paper's generator width (ngf 64) and more local steps; not run yet.
#   Each client takes 1/nodes of the GPU, so all 10 train at once.
SIZES = {
    "cpu": {
        "ngf": 8,
        "num-server-rounds": 4,
        "local-steps": 5,
        "eval-every": 1,
        "eval-samples": 500,
        "fraction-evaluate": 0.0,
    },
    "cpu-long": {
        "ngf": 8,
        "num-server-rounds": 24,
        "local-steps": 5,
        "eval-every": 2,
        "eval-samples": 500,
        "fraction-evaluate": 0.0,
    },
    "gpu": {
        "ngf": 64,
        "num-server-rounds": 30,
        "local-steps": 20,
        "eval-every": 2,
        "eval-samples": 2000,
        "fraction-evaluate": 0.0,
        "device": "cuda",
    },
}


def run_row(history: list[dict], summary: dict, metric: str) -> dict:
    """The figures of one run that the report needs, from its ``history.json`` and ``summary.json``."""
    rounds = [r for r in history if r["round"] >= 1 and r["clients"]]
    lambdas = [r["mada_lambda"] for r in rounds if r.get("mada_lambda") is not None]  # PRISM only
    return {
        "final": summary["final_eval"],
        "series": run_series(history, metric),
        "uplink_bytes_per_client_round": rounds[-1]["uplink_bytes"] / rounds[-1]["clients"],
        "downlink_bytes_per_client_round": rounds[-1]["downlink_bytes"] / rounds[-1]["clients"],
        "uplink_bits_per_weight": rounds[-1]["uplink_bits_per_weight"],
        "mean_lambda": statistics.mean(lambdas) if lambdas else None,
        "model_bytes": summary["model_bytes"],
        "dense_float32_bytes": summary["dense_float32_bytes"],
    }


def machine() -> dict:
    """Where the figures were measured: they are only comparable on the same machine."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "platform": platform.platform(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, help="override num-server-rounds of --size")
    ap.add_argument("--steps", type=int, help="override local-steps of --size")
    ap.add_argument("--partitionings", nargs="+", default=list(PARTITIONINGS), choices=list(PARTITIONINGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, help="default results/experiments-<size>")
    args = ap.parse_args()
    out = args.out or Path(f"results/experiments-{args.size}")
    settings = {**SIZES[args.size], "nodes": args.nodes}
    if args.rounds:
        settings["num-server-rounds"] = args.rounds
    if args.steps:
        settings["local-steps"] = args.steps
    run_cfg = {k: v for k, v in settings.items() if k != "nodes"}
    gpus = 1 / args.nodes if run_cfg.get("device") == "cuda" else 0.0

    rows = []
    for part in args.partitionings:
        for method in args.methods:
            for seed in args.seeds:
                tag = f"{part}-{method}-seed{seed}"
                cfg = {
                    **run_cfg,
                    **METHODS[method],
                    **PARTITIONINGS[part],
                    "partitioning": part,
                    "seed": seed,
                    "min-train-nodes": args.nodes,
                }
                # A finished run with the same run config is kept: re-running the command after an
                # interruption (or in chunks, within a device's time per call) goes on from there.
                row_path = out / "runs" / f"{tag}.json"
                saved = json.loads(row_path.read_text()) if row_path.is_file() else None
                if saved is not None and saved["run_config"] == cfg:
                    rows.append(saved)
                    continue
                res = run_app(
                    cfg,
                    out / "runs" / tag,
                    nodes=args.nodes,
                    gpus_per_node=gpus,
                    log=out / "runs" / f"{tag}.log",
                )
                metric = res["summary"]["eval_features"]["metric"]
                rows.append(
                    {
                        "partitioning": part,
                        "method": method,
                        "seed": seed,
                        "run_config": cfg,
                        "metric": metric,
                        **run_row(res["history"], res["summary"], metric),
                        "wall_seconds": res["wall_seconds"],
                        "machine": machine(),
                    }
                )
                row_path.write_text(json.dumps(rows[-1], indent=1))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "series"}), flush=True)

    machines = {json.dumps(r["machine"], sort_keys=True) for r in rows}
    if len(machines) > 1:
        raise SystemExit(f"runs in {out} were measured on different machines {machines}: use another --out")
    doc = {
        "settings": settings,
        "seeds": args.seeds,
        "metric": rows[0]["metric"],
        "machine": rows[0]["machine"],
        "total_wall_seconds": sum(r["wall_seconds"] for r in rows),
        "rows": rows,
    }
    (out / "experiments.json").write_text(json.dumps(doc, indent=1))
    write_report(out)
    print(json.dumps({"bench": "experiments", **doc}))


if __name__ == "__main__":
    main()
