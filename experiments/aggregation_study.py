"""Aggregation study: MADA, the plain mean and the rules beyond the paper, over seeds and splits.

    python -m experiments.aggregation_study --size small --out results/aggregation-small
    python -m experiments.aggregation_study --size paper --out results/aggregation-paper --seeds 30
    python -m experiments.aggregation_study --size small --shard 0/3 ...   # one of 3 parallel workers
    python -m experiments.aggregation_study --size small --out DIR --report-only

Every run is ``prism_flwr.federated.inprocess.run``: the ClientApp's client round and the MADA strategy's
aggregation in one process (no Flower start-up per point; ``tests/test_inprocess.py`` checks an
in-process run against ``flwr run``). Runs go seed by seed (all rules of a seed before the next
seed), each saved as ``<out>/runs/<tag>.json`` as soon as it ends and reused when the command is
repeated; ``--deadline-min`` stops starting new runs after that many minutes. The report
(``study.md``, ``quality_vs_rounds.png``, ``quality_vs_uplink.png``, ``study.json``) compares
FD-FMNIST-CNN by round and by cumulative uplink (mean ± sd over seeds), MADA's lambda against its
no-change expectation, and says for each rule whether it is at least as good as the better of
MADA and the plain mean at every evaluated round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from experiments.report import mean_spread, plot, run_series, value_at_budget
from prism_flwr.config import RunConfig  # noqa: E402
from prism_flwr.evaluation.evaluator import Evaluator  # noqa: E402
from prism_flwr.federated import inprocess
from prism_flwr.federated.aggregation import AGGREGATIONS  # noqa: E402

# Run-config keys per size; "clients" is the number of simulated clients (all take part).
SIZES = {
    # the largest setting a 2-core CPU allows: ngf 16, 4 clients, >= 50 local steps, >= 20 rounds
    "small": {
        "clients": 4,
        "ngf": 16,
        "local-steps": 50,
        "num-server-rounds": 20,
        "eval-every": 2,
        "eval-samples": 2000,
    },
    # the paper's width and local steps, 10 clients
    "paper": {
        "clients": 10,
        "ngf": 64,
        "local-steps": 100,
        "num-server-rounds": 40,
        "eval-every": 4,
        "eval-samples": 2000,
    },
    # seconds, for the test suite
    "tiny": {
        "clients": 2,
        "ngf": 4,
        "local-steps": 3,
        "num-server-rounds": 2,
        "eval-every": 1,
        "eval-samples": 50,
        "eval-feature-metrics": False,
    },
}
PARTITIONINGS = {"shards": {}, "dirichlet": {"dirichlet-alpha": 0.1}}


def run_config(size: str, rule: str, seed: int, partitioning: str, overrides: dict) -> tuple[RunConfig, int]:
    keys = {k: v for k, v in SIZES[size].items() if k != "clients"}
    keys.update(
        {
            "aggregation": rule,
            "seed": seed,
            "partitioning": partitioning,
            **PARTITIONINGS[partitioning],
            "fraction-evaluate": 0.0,
            **overrides,
        }
    )
    return RunConfig.parse(keys), SIZES[size]["clients"]


def machine() -> str:
    return (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else "2-core CPU"
        if torch.get_num_threads() <= 2
        else f"CPU ({torch.get_num_threads()} threads)"
    )


def run_grid(args, out: Path) -> None:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    evaluators: dict[int, Evaluator] = {}
    grid = [(seed, part, rule) for seed in args.seeds for part in args.partitionings for rule in args.rules]
    index, count = (int(x) for x in args.shard.split("/"))
    for i, (seed, part, rule) in enumerate(grid):
        if i % count != index:
            continue
        tag = f"{args.size}-{part}-{rule}-s{seed}"
        cfg, clients = run_config(args.size, rule, seed, part, args.overrides)
        path = runs / f"{tag}.json"
        if (
            path.is_file()
            and json.loads(path.read_text())["config"] == cfg.model_dump(by_alias=True)
            and not json.loads(path.read_text())["history"][-1].get("stopped_early")
        ):
            print(f"[study] {tag}: done before, reused", flush=True)
            continue
        if args.deadline_min is not None and time.time() - start > 60 * args.deadline_min:
            print(f"[study] deadline reached before {tag}", flush=True)
            break
        if seed not in evaluators:
            evaluators[seed] = Evaluator(
                cfg.dataset,
                cfg.resolved_data_dir(),
                cfg.eval_samples,
                seed,
                "cuda" if torch.cuda.is_available() else "cpu",
                feature_metrics=cfg.eval_feature_metrics,
            )
        t0 = time.time()
        deadline = None if args.run_deadline_min is None else t0 + 60 * args.run_deadline_min
        history = inprocess.run(
            cfg,
            clients,
            evaluator=evaluators[seed],
            deadline=deadline,
            samples_dir=runs / tag if args.samples else None,
            on_record=lambda r, tag=tag: (
                print(f"[study] {tag} round {r['round']}: {json.dumps(r)}", flush=True)
                if args.verbose
                else None
            ),
        )
        doc = {
            "tag": tag,
            "rule": rule,
            "seed": seed,
            "partitioning": part,
            "clients": clients,
            "config": cfg.model_dump(by_alias=True),
            "history": history,
            "machine": machine(),
            "wall_seconds": time.time() - t0,
        }
        path.write_text(json.dumps(doc))
        print(
            f"[study] {tag}: {len(history) - 1} rounds in {doc['wall_seconds']:.0f} s; last eval "
            f"{next((r['eval'] for r in reversed(history) if 'eval' in r), None)}",
            flush=True,
        )


def dominance(rows: list[dict], part: str, rule: str) -> str:
    """Is ``rule`` at least as good as the better of mada and mean at every evaluated round (means
    over seeds), and better somewhere? Compared on the rounds all three share."""

    def means(r):
        group = [row for row in rows if row["partitioning"] == part and row["method"] == r]
        if not group:
            return None
        by_round: dict[int, list[float]] = {}
        for row in group:
            for p in row["series"]:
                by_round.setdefault(p["round"], []).append(p["value"])
        return {k: statistics.mean(v) for k, v in by_round.items() if len(v) == len(group)}

    mine, mada, mean = means(rule), means("mada"), means("mean")
    if not mine or not mada or not mean:
        return "-"
    rounds = sorted(set(mine) & set(mada) & set(mean) - {0})
    if not rounds:
        return "-"
    best = {k: min(mada[k], mean[k]) for k in rounds}
    never_worse = all(mine[k] <= best[k] for k in rounds)
    better = [k for k in rounds if mine[k] < best[k]]
    return f"{'yes' if never_worse and better else 'no'} (better at {len(better)}/{len(rounds)} rounds)"


def _paired_table(rows: list[dict], order: list[str]) -> str:
    """Each rule against the plain mean run on the same seed (same network, partition, random streams):
    at how many (seed, evaluated round) pairs is it better, and its FD minus the mean's at the end."""
    lines = [
        "Paired with the plain mean (same seed: same random network, partition and random streams):",
        "",
        "| partitioning | rule | better than mean at (seed, round) pairs | last round: rule - mean, per seed |",
        "|---|---|---|---|",
    ]
    for part in dict.fromkeys(r["partitioning"] for r in rows):
        means = {
            r["seed"]: {p["round"]: p["value"] for p in r["series"]}
            for r in rows
            if r["partitioning"] == part and r["method"] == "mean"
        }
        for rule in order:
            if rule == "mean":
                continue
            pairs, last = [], []
            for r in rows:
                if r["partitioning"] != part or r["method"] != rule or r["seed"] not in means:
                    continue
                ref = means[r["seed"]]
                shared = [p for p in r["series"] if p["round"] in ref and p["round"] > 0]
                pairs += [p["value"] < ref[p["round"]] for p in shared]
                if shared:
                    last.append(f"{shared[-1]['value'] - ref[shared[-1]['round']]:+.1f}")
            if pairs:
                lines.append(f"| {part} | {rule} | {sum(pairs)}/{len(pairs)} | {', '.join(last)} |")
    return "\n".join(lines)


def _budget_table(rows: list[dict], order: list[str], metric: str) -> str:
    """Uplink per client over the whole run, and quality at an equal uplink budget: the smallest
    total any rule of the partitioning used (each seed's last evaluated round within it)."""
    lines = [
        f"Uplink per client over the run (MB, mean ± sd over seeds), and {metric} at the last evaluated "
        "round whose cumulative uplink fits the smallest of those totals (same budget for every rule):",
        "",
        "| partitioning | rule | uplink MB | budget MB | round reached | " + metric + " at budget |",
        "|---|---|---|---|---|---|",
    ]
    for part in dict.fromkeys(r["partitioning"] for r in rows):
        groups = {
            rule: [r for r in rows if r["partitioning"] == part and r["method"] == rule and r["series"]]
            for rule in order
        }
        groups = {rule: g for rule, g in groups.items() if g}
        if not groups:
            continue
        budget = min(statistics.mean(r["series"][-1]["uplink_mb"] for r in g) for g in groups.values())
        for rule, group in groups.items():
            at = [value_at_budget(r["series"], budget) for r in group]
            lines.append(
                f"| {part} | {rule} | {mean_spread([r['series'][-1]['uplink_mb'] for r in group])} | "
                f"{budget:.3f} | {mean_spread([p['round'] for p in at])} | "
                f"{mean_spread([p['value'] for p in at])} |"
            )
    return "\n".join(lines)


def report(out: Path, metric_hint: str | None = None) -> dict:
    docs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not docs:
        raise SystemExit(f"no runs under {out / 'runs'}")
    names = [k for d in docs for r in d["history"] for k in (r.get("eval") or {})]
    metric = metric_hint or next((k for k in names if k.startswith(("FD", "FID"))), "mmd_pixels")
    rows = [
        {
            "partitioning": d["partitioning"],
            "method": d["rule"],
            "seed": d["seed"],
            "series": run_series(d["history"], metric),
            "history": d["history"],
        }
        for d in docs
    ]
    rounds = sorted({p["round"] for r in rows for p in r["series"]})
    lines = [
        "| partitioning | rule | seeds | "
        + " | ".join(f"r{k}" for k in rounds)
        + " | mean lambda | mean no-change E[lambda] | >= best of mada/mean at every round |",
        "|---|---|---|" + "---|" * len(rounds) + "---|---|---|",
    ]
    order = [r for r in AGGREGATIONS if any(row["method"] == r for row in rows)]
    for part in dict.fromkeys(r["partitioning"] for r in rows):
        for rule in order:
            group = [r for r in rows if r["partitioning"] == part and r["method"] == rule]
            if not group:
                continue
            cells = []
            for k in rounds:
                vals = [p["value"] for r in group for p in r["series"] if p["round"] == k]
                cells.append(mean_spread(vals) if len(vals) == len(group) else "-")
            lams = [h["mada_lambda"] for r in group for h in r["history"] if h.get("mada_lambda") is not None]
            nochange = [h["lambda_no_change"] for r in group for h in r["history"] if "lambda_no_change" in h]
            lam_cell = f"{statistics.mean(lams):.3f}" if lams else "-"
            nochange_cell = f"{statistics.mean(nochange):.3f}" if nochange else "-"
            dom = dominance(rows, part, rule) if rule not in ("mada", "mean") else "-"
            lines.append(
                f"| {part} | {rule} | {len(group)} | {' | '.join(cells)} | {lam_cell} | {nochange_cell} | {dom} |"
            )
    table = "\n".join(lines)
    budget_table = _paired_table(rows, order) + "\n\n" + _budget_table(rows, order, metric)
    cfg = docs[0]["config"]
    wall = sum(d["wall_seconds"] for d in docs)
    ran = sorted({d["history"][-1]["round"] for d in docs})
    stopped = [d["tag"] for d in docs if d["history"][-1].get("stopped_early")]
    settings = (
        f"ngf {cfg['ngf']}, {docs[0]['clients']} clients, {cfg['local-steps']} local steps, "
        f"up to {cfg['num-server-rounds']} rounds, batch {cfg['batch-size']}, {cfg['objective']} on "
        f"{cfg['features']}, eval on {cfg['eval-samples']} samples every {cfg['eval-every']} rounds"
    )
    (out / "study.md").write_text(
        f"# Aggregation study: {settings}\n\n{metric} (lower is better), mean ± sd over seeds "
        f"{sorted({d['seed'] for d in docs})}; rN = after round N (r0: the untrained network). Measured on "
        f"{docs[0]['machine']}; {len(docs)} runs, {wall / 60:.1f} min of run time in all; rounds run: "
        f"{', '.join(map(str, ran))}"
        + (f" (stopped early at the time budget: {', '.join(stopped)})" if stopped else "")
        + f".\n\n{table}\n\n{budget_table}\n\n"
        f"![quality vs rounds](quality_vs_rounds.png)\n\n![quality vs uplink](quality_vs_uplink.png)\n\n"
        f"![quality vs traffic both ways](quality_vs_traffic.png)\n"
    )
    (out / "study.json").write_text(
        json.dumps(
            {
                "metric": metric,
                "settings": settings,
                "rows": [{k: v for k, v in r.items() if k != "history"} for r in rows],
            }
        )
    )
    plot(rows, metric, "round", out / "quality_vs_rounds.png")
    plot(rows, metric, "uplink_mb", out / "quality_vs_uplink.png")
    plot(rows, metric, "total_mb", out / "quality_vs_traffic.png")
    print(table, flush=True)
    return {"metric": metric, "table": table}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rules", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[30, 31, 32])
    p.add_argument("--partitionings", nargs="+", choices=PARTITIONINGS, default=list(PARTITIONINGS))
    p.add_argument(
        "--shard", default="0/1", help="i/n: run every n-th grid point from the i-th (parallel workers)"
    )
    p.add_argument("--deadline-min", type=float, help="start no new run after this many minutes")
    p.add_argument(
        "--run-deadline-min", type=float, help="end a run after the round that passes this many minutes"
    )
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="run-config overrides KEY=VALUE")
    p.add_argument("--samples", action="store_true", help="save sample grids under runs/<tag>/")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.overrides = {
        k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
        for k, v in (o.split("=", 1) for o in args.overrides)
    }
    if not args.report_only:
        run_grid(args, args.out)
    if args.shard == "0/1" or args.report_only:
        result = report(args.out)
        print(json.dumps({"bench": "aggregation_study", "size": args.size, **result}))
        return result
    return None


if __name__ == "__main__":
    main()
