"""What hostile clients do to PRISM's global model, under the mean, MADA and the robust option.

In-process (no Flower: the damage is a property of the aggregation, not of the transport), on the
2-core CPU size: real Fashion-MNIST split IID over 10 clients, ngf 8, a few rounds of a few local
steps with the kernel-MMD objective (``prism_flwr.model.training.train_local``), every mask
through the codec (``prism_flwr.federated.codec``) and the server's
``prism_flwr.federated.aggregation.aggregate``. Two of the ten clients are attackers, sending
every round:

- ``all-ones`` / ``all-zeros``: the constant mask;
- ``anti-target``: the complement of a Bernoulli sample of the current global theta (every weight
  pushed away from the model);
- ``2-sybil``: one anti-target mask sent by both attackers (two identities, one mask).

``clean`` is the 8 honest clients alone. Methods: ``mean`` (PRISM without MADA), ``mada``, and
``robust`` (MADA after ``prism_flwr.federated.robust.robust_counts`` with the run-config defaults: trim 1,
outlier threshold 3 MADs). Damage: FD-FMNIST-CNN of the final model (``Evaluator``, ``--eval``
samples) minus the clean run's of the same method, and theta drift, the mean over weights of
``|theta_attacked - theta_clean|``.

    nice -n 10 python -m experiments.attack_study            # writes results/security/attacks.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prism_flwr.data.datasets import load_dataset
from prism_flwr.data.partition import partition_indices
from prism_flwr.evaluation.evaluator import Evaluator
from prism_flwr.federated.aggregation import aggregate, count_ones, sigmoid
from prism_flwr.federated.codec import decode_mask, encode_mask
from prism_flwr.federated.robust import robust_counts
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import get_flat, layout_fingerprint, num_masked, sample_mask, set_flat
from prism_flwr.model.training import ClientState, TrainSettings, train_local

REPO = Path(__file__).resolve().parents[1]

ATTACKS = ("clean", "all-ones", "all-zeros", "anti-target", "2-sybil")
METHODS = ("mean", "mada", "robust")


def attacker_masks(kind: str, theta: np.ndarray, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    n = theta.size
    if kind == "clean":
        return []
    if kind == "all-ones":
        return [np.ones(n, bool)] * k
    if kind == "all-zeros":
        return [np.zeros(n, bool)] * k
    if kind == "anti-target":
        return [~(rng.random(n) < theta) for _ in range(k)]
    if kind == "2-sybil":
        return [~(rng.random(n) < theta)] * k
    raise ValueError(kind)


def run(method: str, attack: str, args, data, parts, features, spec) -> tuple[np.ndarray, dict]:
    model = ResnetGenerator(spec)
    n, layout = num_masked(model), layout_fingerprint(model)
    scores = get_flat(model, "scores").numpy()
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=0.1, objective="mmd")
    states = [ClientState() for _ in range(args.honest)]
    info: dict = {"dropped_outliers": 0, "dropped_duplicates": 0}
    for rnd in range(1, args.rounds + 1):
        wire = []
        for c in range(args.honest):
            set_flat(model, torch.from_numpy(scores), "scores")
            torch.manual_seed(derive_seed(args.seed, rnd, c, 0))
            gen = torch.Generator().manual_seed(derive_seed(args.seed, rnd, c, 1))
            train_local(model, features, data[c], settings, states[c], generator=gen)
            mask = sample_mask(
                model, generator=torch.Generator().manual_seed(derive_seed(args.seed, rnd, c, 5))
            )
            wire.append(encode_mask(mask.numpy(), layout))
        evil = attacker_masks(
            attack, sigmoid(scores), np.random.default_rng([args.seed, rnd, 99]), args.attackers
        )
        wire += [encode_mask(m, layout) for m in evil]
        packed = [decode_mask(b, n, layout) for b in wire]  # the server's codec checks
        if method == "robust":
            counts, k, ri = robust_counts(packed, n, trim=args.trim, outlier_mads=args.outlier_mads)
            info["dropped_outliers"] += len(ri.outliers)
            info["dropped_duplicates"] += len(ri.duplicates)
        else:
            counts, k = count_ones(packed, n)
        res = aggregate(
            scores,
            counts,
            k,
            method="mean" if method == "mean" else "mada",
            rng=np.random.default_rng([args.seed, rnd]),
        )
        scores = res.scores
    return scores, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--honest", type=int, default=8)
    ap.add_argument("--attackers", type=int, default=2)
    ap.add_argument("--ngf", type=int, default=8)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--eval", type=int, default=500, help="samples for FD-FMNIST-CNN")
    ap.add_argument("--trim", type=int, default=1)
    ap.add_argument("--outlier-mads", type=float, default=3.0)
    ap.add_argument("--data-dir", default="~/.cache/prism-flwr/data")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "security")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    train = load_dataset("fmnist", Path(args.data_dir).expanduser(), train=True)
    clients = args.honest + args.attackers
    parts = partition_indices(train.labels, clients, "iid", args.seed)
    data = [train.to_float(parts[c]) for c in range(args.honest)]  # the last clients are the attackers
    features = build_features("pixels")
    spec = GeneratorSpec(nz=128, ngf=args.ngf, nc=1, seed=args.seed)
    evaluator = Evaluator("fmnist", Path(args.data_dir).expanduser(), args.eval, args.seed)
    model = ResnetGenerator(spec)
    rows, finals = [], {}
    for method in args.methods:
        for attack in args.attacks:
            t = time.time()
            scores, info = run(method, attack, args, data, parts, features, spec)
            set_flat(model, torch.from_numpy(scores), "scores")
            metrics, _ = evaluator.evaluate(model, "sample")
            finals[(method, attack)] = sigmoid(scores)
            row = {
                "method": method,
                "attack": attack,
                "fd": metrics[evaluator.metric_name],
                "mmd_pixels": metrics["mmd_pixels"],
                "theta_density": float(sigmoid(scores).mean()),
                "seconds": time.time() - t,
                **info,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        clean = next((r for r in rows if r["method"] == row["method"] and r["attack"] == "clean"), None)
        if clean is not None:
            row["fd_damage"] = row["fd"] - clean["fd"]
            row["theta_drift"] = float(
                np.abs(finals[(row["method"], row["attack"])] - finals[(row["method"], "clean")]).mean()
            )
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "metric": evaluator.metric_name,
        "seconds": time.time() - t0,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attacks.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"| attack | method | {evaluator.metric_name} | damage (FD - clean FD) | theta drift | theta density | "
        "masks dropped (outlier / duplicate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (ATTACKS.index(r["attack"]), METHODS.index(r["method"]))):
        dropped = f"{r['dropped_outliers']} / {r['dropped_duplicates']}" if r["method"] == "robust" else "-"
        lines.append(
            f"| {r['attack']} | {r['method']} | {r['fd']:.1f} | {r.get('fd_damage', 0):+.1f} | "
            f"{r.get('theta_drift', 0):.4f} | {r['theta_density']:.3f} | {dropped} |"
        )
    (args.out / "attacks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
