"""In-process trials for the default run: which settings give the best samples for its budget?

    nice -n 10 python -m experiments.default_trials [--trials NAME ...] [--eval-samples 1000]

The default run's shape without Flower: real Fashion-MNIST, 4 clients with label shards (4 per
client), ngf 16, seed 30, the same client seeds, mask sampling, bit counting and aggregation as
``client_app.py`` / ``strategies/mada.py``. Every trial spends the same compute: rounds x local
steps x batch = 15 x 20 x 64 = 19,200 generated images per client (CPU time is shared here, so
compute is counted, not timed). After the last round the server's ``Evaluator`` scores the global
model (a mask sampled from theta, as the ServerApp does) on ``--eval-samples`` images against the
test split: FD on our Fashion-MNIST classifier's features, precision/recall/density/coverage.
The classifier is only the yardstick: no trial trains on it or on its features.

Results are appended to ``results/default-run/trials.json`` (a trial already there is skipped, so
an interrupted run resumes); ``--report`` writes ``results/default-run/trials.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.evaluation.evaluator import Evaluator, save_grid
from prism_flwr.federated.aggregation import aggregate, count_ones
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model import objectives, training
from prism_flwr.model.build import generator_spec
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores, iter_thetas, sample_mask, set_scores
from prism_flwr.model.training import ClientState, TrainSettings, train_local

OUT = Path(__file__).resolve().parent.parent / "results" / "default-run"
CLIENTS = 4

# name -> settings; every trial: rounds * steps * batch = 19,200 images per client.
TRIALS: dict[str, dict] = {
    "today: pixels, fixed widths, MADA, 15 x 20": dict(
        rounds=15, steps=20, agg="mada", features="pixels", bw="fixed"
    ),
    "pixels, fixed widths, mean, 3 x 100": dict(
        rounds=3, steps=100, agg="mean", features="pixels", bw="fixed"
    ),
    "pixels, median widths, mean, 3 x 100": dict(
        rounds=3, steps=100, agg="mean", features="pixels", bw=(0.5, 1, 2, 4)
    ),
    "random-conv, median widths, mean, 3 x 100": dict(
        rounds=3, steps=100, agg="mean", features="random-conv", bw=(0.5, 1, 2, 4)
    ),
    "pixels, sharp median widths, mean, 3 x 100": dict(
        rounds=3, steps=100, agg="mean", features="pixels", bw=(0.125, 0.25, 0.5, 1, 2)
    ),
    "random-conv, median widths, MADA, 6 x 50": dict(
        rounds=6, steps=50, agg="mada", features="random-conv", bw=(0.5, 1, 2, 4)
    ),
    "random-conv, median widths, mean, 6 x 50": dict(
        rounds=6, steps=50, agg="mean", features="random-conv", bw=(0.5, 1, 2, 4)
    ),
    "random-conv, median widths, mean, 3 x 50, batch 128": dict(
        rounds=3, steps=50, batch=128, agg="mean", features="random-conv", bw=(0.5, 1, 2, 4)
    ),
    "random-conv, median widths, mean, 3 x 100, lr 0.2": dict(
        rounds=3, steps=100, lr=0.2, agg="mean", features="random-conv", bw=(0.5, 1, 2, 4)
    ),
    "pixels, fixed widths, mean, 2 x 150": dict(
        rounds=2, steps=150, agg="mean", features="pixels", bw="fixed"
    ),
    "pixels, fixed widths, mean, 3 x 50, batch 128": dict(
        rounds=3, steps=50, batch=128, agg="mean", features="pixels", bw="fixed"
    ),
    "pixels, fixed widths, mean, 3 x 100, lr 0.2": dict(
        rounds=3, steps=100, lr=0.2, agg="mean", features="pixels", bw="fixed"
    ),
}


def median_widths(x: torch.Tensor, y: torch.Tensor, factors: tuple[float, ...]) -> tuple[float, ...]:
    """The median heuristic: ``f * median |z_i - z_j|`` over the pooled batch, for each ``f``."""
    with torch.no_grad():
        z = torch.cat([x.flatten(1), y.flatten(1)])
        d2 = torch.cdist(z, z).pow(2)
        med = d2[~torch.eye(len(z), dtype=torch.bool)].median().clamp_min(1e-12).sqrt().item()
    return tuple(f * med for f in factors)


def set_bandwidths(bw) -> None:
    """Point the local objective at fixed pixel widths or at median-rule multiples ``bw``."""
    if bw == "fixed":  # the objective's own default: MMD_BANDWIDTHS scaled by sqrt(d / 1024)
        training.mmd2_unbiased = objectives.mmd2_unbiased
    else:
        factors = tuple(float(f) for f in bw)
        training.mmd2_unbiased = lambda x, y: objectives.mmd2_unbiased(x, y, median_widths(x, y, factors))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def run_trial(
    spec: dict, evaluator: Evaluator, data: list[torch.Tensor], seed: int, grid: Path | None = None
) -> dict:
    cfg = RunConfig(seed=seed)
    set_bandwidths(spec["bw"])
    batch = spec.get("batch", 64)
    settings = TrainSettings(steps=spec["steps"], batch_size=batch, lr=spec.get("lr", 0.1), objective="mmd")
    features = build_features(spec["features"])
    model = ResnetGenerator(generator_spec(cfg))
    scores = get_scores(model).numpy().copy()
    n = scores.size
    states = [ClientState() for _ in range(CLIENTS)]
    lambdas, losses = [], []
    t0 = time.process_time()
    for rnd in range(1, spec["rounds"] + 1):
        packed = []
        for pid in range(CLIENTS):  # as client_app.train: same seeds per (seed, round, client)
            set_scores(model, torch.from_numpy(scores))
            torch.manual_seed(derive_seed(seed, rnd, pid, 0))
            gen = torch.Generator().manual_seed(derive_seed(seed, rnd, pid, 1))
            m = train_local(model, features, data[pid], settings, states[pid], generator=gen)
            losses.append(m["loss"])
            thetas = [t.cpu() for t in iter_thetas(model)]
            mask = sample_mask(
                model, thetas, generator=torch.Generator().manual_seed(derive_seed(seed, rnd, pid, 5))
            )
            packed.append(np.packbits(mask.numpy().astype(np.uint8), bitorder="little"))
        counts, k = count_ones(packed, n)
        res = aggregate(scores, counts, k, method=spec["agg"], rng=np.random.default_rng([seed, rnd]))
        scores = res.scores
        lambdas.append(res.mada_lambda)
        print(f"  round {rnd}/{spec['rounds']}: loss {np.mean(losses[-CLIENTS:]):.4f}", flush=True)
    cpu_train = time.process_time() - t0
    set_scores(model, torch.from_numpy(scores))
    metrics, fake = evaluator.evaluate(model, "sample")
    if grid is not None:  # the first 64 of the evaluated samples, as the ServerApp's samples/ grids
        save_grid(fake[:64], grid)
    return {
        "settings": {**spec, "batch": batch, "lr": spec.get("lr", 0.1), "bw": spec["bw"]},
        "images_per_client": spec["rounds"] * spec["steps"] * batch,
        "seed": seed,
        "eval": metrics,
        "final_loss": float(np.mean(losses[-CLIENTS:])),
        "mada_lambda_last": None if np.isnan(lambdas[-1]) else lambdas[-1],
        "train_cpu_seconds": round(cpu_train, 1),
    }


def report(results: dict, path: Path, metric: str) -> None:
    """Markdown table of ``results``; "vs today" against the trial named "today: ..."."""

    def tag(name: str) -> str:  # "[seed 30, eval 1000]": trials compare within one seed and sample count
        return name[name.rfind("[") :]

    base = {tag(n): r["eval"][metric] for n, r in results.items() if n.startswith("today")}
    lines = [
        "| trial | images/client | FD-FMNIST-CNN | vs today | precision | recall | density | coverage | "
        "mmd_pixels | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda n: (tag(n), not n.startswith("today"), results[n]["eval"][metric]))
    for name in order:  # today first, then best first
        r = results[name]
        e = r["eval"]
        vs = f"{100 * e[metric] / base[tag(name)]:.0f} %" if tag(name) in base else "-"
        lines.append(
            f"| {name} | {r['images_per_client']:,} | {e[metric]:.1f} | {vs} | "
            f"{e['precision']:.3f} | {e['recall']:.3f} | {e['density']:.3f} | {e['coverage']:.3f} | "
            f"{e['mmd_pixels']:.4f} | {r['train_cpu_seconds']} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", nargs="*", default=list(TRIALS), help="trial names (default: all)")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--out", type=Path, default=OUT / "trials.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--report",
        action="store_true",
        help="only write trials.md from every trials*.json beside --out (runs in parallel processes)",
    )
    args = ap.parse_args()
    if args.report:
        merged = {}
        for path in sorted(args.out.parent.glob("trials*.json")):
            merged.update(json.loads(path.read_text()))
        report(merged, args.out.parent / "trials.md", "FD-FMNIST-CNN")
        return
    torch.set_num_threads(args.threads)
    cfg = RunConfig(seed=args.seed)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data = [client_data(cfg, pid, CLIENTS, torch.device("cpu"))[0] for pid in range(CLIENTS)]
    evaluator = Evaluator(cfg.dataset, cfg.resolved_data_dir(), args.eval_samples, args.seed)
    key = f"seed {args.seed}, eval {args.eval_samples}"
    for name in args.trials:
        if f"{name} [{key}]" in results:
            continue
        print(f"trial: {name}", flush=True)
        r = run_trial(
            TRIALS[name],
            evaluator,
            data,
            args.seed,
            grid=args.out.parent / "samples" / f"{slug(name)}-seed{args.seed}.png",
        )
        print(f"  -> {json.dumps(r['eval'])} ({r['train_cpu_seconds']} CPU s)", flush=True)
        results[f"{name} [{key}]"] = r
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    report(results, args.out.with_suffix(".md"), evaluator.metric_name)


if __name__ == "__main__":
    main()
