"""Image quality under differential privacy: dp = off / theta / statistics at epsilon 1 and 9.8.

    python -m experiments.privacy_experiment [--rounds 10] [--steps 20] [--ngf 16] [--out results/privacy]

Non-IID Fashion-MNIST (label shards), 4 simulated clients, the feature-matching objective (the one
``dp = "statistics"`` protects), pixel features. Every configuration is one real ``flwr run``.
Writes ``<out>/privacy.md`` (table) and ``<out>/privacy.json``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.runner import run_app

SETTINGS = [("off", None), ("theta", 9.8), ("theta", 1.0), ("statistics", 9.8), ("statistics", 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/privacy"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for dp, eps in SETTINGS:
        tag = f"dp-{dp}" + (f"-eps{eps:g}" if eps else "")
        cfg = {
            "dp": dp,
            "objective": "feature-matching",
            "features": "pixels",
            "partitioning": "shards",
            "num-server-rounds": args.rounds,
            "local-steps": args.steps,
            "ngf": args.ngf,
            "eval-every": args.rounds,
            "min-train-nodes": args.nodes,
        }
        if eps:
            cfg["dp-epsilon"] = eps
        res = run_app(cfg, args.out / "runs" / tag, nodes=args.nodes, log=args.out / "runs" / f"{tag}.log")
        last = res["history"][-1]
        eps_spent = max((last.get("dp_epsilon_per_client") or {"-": 0.0}).values())
        rows.append(
            {
                "dp": dp,
                "epsilon_budget": eps,
                "epsilon_spent": eps_spent,
                **res["summary"]["final_eval"],
                "wall_seconds": res["wall_seconds"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    metrics = [k for k in rows[0] if k not in {"dp", "epsilon_budget", "epsilon_spent", "wall_seconds"}]
    lines = [
        "| dp | epsilon budget | epsilon spent (max over clients) | " + " | ".join(metrics) + " | wall s |",
        "|---|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dp']} | {r['epsilon_budget'] or '-'} | {r['epsilon_spent']:.3g} | "
            + " | ".join(f"{r[m]:.4g}" for m in metrics)
            + f" | {r['wall_seconds']:.0f} |"
        )
    (args.out / "privacy.md").write_text("\n".join(lines) + "\n")
    (args.out / "privacy.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"bench": "privacy", "rows": rows}))


if __name__ == "__main__":
    main()
