"""MADA's late phase: branch from the plain mean's state at rounds 20 and 60 into `mada` vs `mean`.

    python -m experiments.late_phase --out results/aggregation-late [--seeds 30 31 32] [--steps 20]
    python -m experiments.late_phase --out results/aggregation-late --report-only

Per seed a trunk runs the plain mean for ``BRANCH_AT[-1] + LENGTH`` rounds. At each round of
``BRANCH_AT`` the whole state is copied (the global scores, which are all the state `mean` and
`mada` keep on the server, and every client's record: its Adam moments and mask secret) and a
branch runs `mada` for ``LENGTH`` rounds from it; `mean` from the same point is the trunk itself,
so the pair shares network, partition and every random stream up to the rule. The rounds are
``inprocess.one_round``'s, the in-process runner's round (``client_round``, the coded uplink
through the codec, the server step), from each arm's own state. Work goes phase by phase over
all seeds (trunk to 20, both arms 20->60, both arms 60->100, each mada round next to its mean
round), so a deadline cuts the late branch first and every pair is timed under the same load. FD-FMNIST-CNN every ``EVAL_EVERY`` rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np

from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.evaluation.evaluator import Evaluator
from prism_flwr.federated import inprocess
from prism_flwr.federated.aggregation import Aggregator
from prism_flwr.federated.client_round import model_with, new_record
from prism_flwr.federated.methods import PRISM
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores, layout_fingerprint
from prism_flwr.privacy import insecure_test_secret
from prism_flwr.threads import configure_threads

BRANCH_AT = (20, 60)
LENGTH = 40
EVAL_EVERY = 10
CLIENTS = 4


class Arm:
    """One line of rounds: global scores, client records and the server's rule."""

    def __init__(self, rule: str, cfg: RunConfig, scores: np.ndarray, records: list, rnd: int) -> None:
        self.rule, self.scores, self.records, self.round = rule, scores, records, rnd
        self.aggregator = Aggregator(rule, cfg.mada_space)
        self.evals: dict[int, float] = {}
        self.lambdas: dict[int, float] = {}
        self.seconds = 0.0

    def branch(self, rule: str, cfg: RunConfig) -> Arm:
        return Arm(rule, cfg, self.scores.copy(), copy.deepcopy(self.records), self.round)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "round": self.round, "evals": self.evals, "lambdas": self.lambdas}


class Seed:
    """Everything of one seed that every arm shares: config, data, network layout, evaluator."""

    def __init__(self, seed: int, ngf: int, steps: int, eval_samples: int) -> None:
        self.cfg = RunConfig.parse(
            {"seed": seed, "ngf": ngf, "local-steps": steps, "aggregation": "mean", "device": "cpu"}
        )
        self.eval_samples = eval_samples
        template = ResnetGenerator(generator_spec(self.cfg))
        self.layout = layout_fingerprint(template)
        self.downlink = PRISM.downlink(self.cfg)
        self.clients = [client_data(self.cfg, pid, CLIENTS, "cpu") for pid in range(CLIENTS)]
        self.evaluator = Evaluator(
            self.cfg.dataset, self.cfg.resolved_data_dir(), eval_samples, seed, "cpu", feature_metrics=True
        )
        records = [new_record(self.cfg, insecure_test_secret(seed, pid)) for pid in range(CLIENTS)]
        self.trunk = Arm("mean", self.cfg, self.downlink.settle(get_scores(template).numpy()), records, 0)
        self.branches: dict[int, Arm] = {}
        self.evaluate(self.trunk)

    def evaluate(self, arm: Arm) -> None:
        model = model_with(self.cfg, PRISM, arm.scores, "cpu")
        metrics, _ = self.evaluator.evaluate(model, PRISM.eval_mask_mode)
        arm.evals[arm.round] = metrics[self.evaluator.metric_name]

    def step(self, arm: Arm) -> None:
        """One round of ``arm``: the in-process runner's round from the arm's state."""
        t0 = time.perf_counter()
        rnd = arm.round + 1
        agg, arm.records, _ = inprocess.one_round(
            self.cfg, self.clients, arm.records, arm.scores, arm.aggregator, self.downlink, self.layout, rnd
        )
        arm.aggregator.commit(agg)
        arm.scores, arm.round = agg.scores, rnd
        if not np.isnan(agg.mada_lambda):
            arm.lambdas[rnd] = float(agg.mada_lambda)
        arm.seconds += time.perf_counter() - t0
        if rnd % EVAL_EVERY == 0:
            self.evaluate(arm)

    def to_dict(self) -> dict:
        return {
            "seed": self.cfg.seed,
            "config": self.cfg.model_dump(by_alias=True),
            "clients": CLIENTS,
            "eval_samples": self.eval_samples,
            "trunk": self.trunk.to_dict(),
            "branches": {str(k): arm.to_dict() for k, arm in self.branches.items()},
            "seconds": self.trunk.seconds + sum(a.seconds for a in self.branches.values()),
        }


def run(args) -> None:
    configure_threads(1)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    seeds = [Seed(s, args.ngf, args.steps, args.eval_samples) for s in args.seeds]
    stop = time.time() + 60 * args.deadline_min

    def save() -> None:
        for s in seeds:
            (out / "runs" / f"seed-{s.cfg.seed}.json").write_text(json.dumps(s.to_dict(), indent=1))

    ends = [*BRANCH_AT, BRANCH_AT[-1] + LENGTH]
    for end in ends:
        for s in seeds:
            arms = [s.trunk] + [a for k, a in s.branches.items() if k < end and a.round < k + LENGTH]
            while s.trunk.round < end:
                if time.time() > stop:
                    print(f"[late] deadline: seed {s.cfg.seed} stopped at round {s.trunk.round}", flush=True)
                    save()
                    return
                for arm in arms:
                    if arm.round < end:
                        s.step(arm)
                print(
                    f"[late] seed {s.cfg.seed} round {s.trunk.round}: "
                    + ", ".join(f"{a.rule}@{a.round} FD {a.evals.get(a.round, '-')}" for a in arms),
                    flush=True,
                )
            if end in BRANCH_AT:  # the checkpoint: copied, and the scores kept on disk
                s.branches[end] = s.trunk.branch("mada", s.cfg)
                np.save(out / "runs" / f"seed-{s.cfg.seed}-round-{end}-scores.npy", s.trunk.scores)
            save()
    save()


def paired(rows: list[dict], branch: int) -> list[tuple[int, int, float, float]]:
    """``(seed, round, mada FD, mean FD)`` at every evaluated round of the branch from ``branch``."""
    pairs = []
    for row in rows:
        arm = row["branches"].get(str(branch))
        if arm is None:
            continue
        for rnd, fd in arm["evals"].items():
            if int(rnd) > branch and rnd in row["trunk"]["evals"]:
                pairs.append((row["seed"], int(rnd), fd, row["trunk"]["evals"][rnd]))
    return pairs


def report(out: Path) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("seed-*.json"))]
    cfg = rows[0]["config"]
    lines = [
        f"# MADA's late phase: ngf {cfg['ngf']}, {rows[0]['clients']} clients, {cfg['local-steps']} local "
        f"steps, batch {cfg['batch-size']}, lr {cfg['lr']}, {cfg['objective']} on {cfg['features']}, "
        f"FD-FMNIST-CNN on {rows[0]['eval_samples']} samples; {sum(r['seconds'] for r in rows) / 60:.0f} min of "
        "round time in all, one process of one thread per seed, on the busy 2-core CPU",
        "",
        "The plain mean runs to the end (the trunk); at each branch round the state (global scores, every "
        "client's record) is copied and `mada` continues from it. Same seed: same network, partition and "
        "random streams. Lower is better.",
        "",
        "| branch at | round | seeds | mean | mada | mada - mean per seed | mada better in |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for branch in BRANCH_AT:
        pairs = paired(rows, branch)
        for rnd in sorted({p[1] for p in pairs}):
            at = [p for p in pairs if p[1] == rnd]
            diffs = [round(p[2] - p[3], 1) for p in at]
            mada, mean = [p[2] for p in at], [p[3] for p in at]
            lines.append(
                f"| {branch} | {rnd} | {len(at)} | {_ms(mean)} | {_ms(mada)} | "
                f"{', '.join(f'{d:+.1f}' for d in diffs)} | {sum(d < 0 for d in diffs)}/{len(diffs)} |"
            )
        better = sum(p[2] < p[3] for p in pairs)
        summary[branch] = {"pairs": len(pairs), "mada_better": better}
        lambdas = [
            v for row in rows for v in row["branches"].get(str(branch), {}).get("lambdas", {}).values()
        ]
        if lambdas:
            summary[branch]["mean_lambda"] = statistics.mean(lambdas)
    lines += ["", "Over all (seed, evaluated round) pairs of each branch:", ""]
    for branch, s in summary.items():
        lam = f", mean MADA lambda {s['mean_lambda']:.3f}" if "mean_lambda" in s else ""
        lines.append(f"- from round {branch}: mada better in {s['mada_better']}/{s['pairs']} pairs{lam}")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({"summary": summary, "seeds": [r["seed"] for r in rows]}))
    return summary


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/aggregation-late")
    ap.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--deadline-min", type=float, default=95.0, help="no round starts after this")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        run(args)
    print(json.dumps(report(Path(args.out))))


if __name__ == "__main__":
    main()
