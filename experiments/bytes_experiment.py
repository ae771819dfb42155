"""Bytes both ways, measured on real training: coded uplink and 8-bit downlink vs float32.

    python -m experiments.bytes_experiment [--ngf 16] [--rounds 15] [--steps 20] [--clients 4]
                                          [--broadcast float32 grid8] [--eval-samples 1000]
                                          [--out results/bytes]

An in-process federation that mirrors the ClientApp and the MADA strategy step for step (same
seeds as client_app.py: torch.manual_seed(derive_seed(seed, round, pid, 0)), latents/batches
from derive_seed(..., 1), the mask from derive_seed(..., 5); the server's MADA samples from
default_rng([seed, round])), real Fashion-MNIST split by label shards, kernel MMD on pixels.
For each broadcast mode:

- ``float32``: the server keeps and sends float32 scores (today's behaviour);
- ``jitter``: a control for ``grid8``: float32 state and broadcast, but every score moved by
  ``U(-STEP/2, STEP/2)`` where ``grid8`` rounds (initial scores and after each aggregation),
  i.e. a perturbation of the rounding's size without the grid: how far FD moves between two
  runs that differ only by noise of that size;
- ``grid8``: the server state is snapped to the 8-bit grid after every aggregation
  (``downlink.snap_to_grid`` with a generator from ``default_rng([seed, round, 8])``), the
  initial scores too (nearest), and the downlink is ``downlink.pack_scores`` (full state) or
  ``downlink.pack_delta`` (change from the previous round's state; both sizes are recorded).

Every client encodes its mask with ``codec.encode_mask(mask, layout, mask_model(global))``; the
server decodes with the same model. Per round it records the coded uplink bits/weight (mean and
max over clients), the ideal cross-entropy of the mask against the coding model, the client's
own theta entropy (``theta_entropy_bits`` as in history.json), the coding cost with the exact
float32 global theta (no grid) and the downlink bits/weight. At the end (and every
``--eval-every`` rounds) the server evaluates FD-FMNIST-CNN on ``--eval-samples`` samples.
Writes ``<out>/bytes-<mode>-ngf<ngf>-seed<seed>.json`` and prints a table and one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.evaluation.evaluator import Evaluator
from prism_flwr.federated.aggregation import aggregate, count_ones, sigmoid
from prism_flwr.federated.codec import decode_mask, encode_mask, mask_method, mask_model
from prism_flwr.federated.downlink import STEP, pack_delta, pack_scores, quantise, snap_to_grid
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model.build import generator_spec, pick_device
from prism_flwr.model.features import build_features
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import (
    get_flat,
    iter_thetas,
    layout_fingerprint,
    num_masked,
    sample_mask,
    set_flat,
)
from prism_flwr.model.training import ClientState, TrainSettings, train_local


def _bits(mask: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-np.where(mask, np.log2(p), np.log2(1 - p)).mean())


def _jitter(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (scores + rng.uniform(-STEP / 2, STEP / 2, scores.size)).astype(np.float32)


def run(mode: str, args: argparse.Namespace) -> dict:
    cfg = RunConfig.parse(
        {"ngf": args.ngf, "local-steps": args.steps, "seed": args.seed, "num-server-rounds": args.rounds}
    )
    device = pick_device(args.device)
    spec = generator_spec(cfg)
    model = ResnetGenerator(spec).to(device)
    n, layout = num_masked(model), layout_fingerprint(model)
    scores = get_flat(model, "scores").numpy().astype(np.float32)
    if mode == "grid8":
        scores = snap_to_grid(scores)
    if mode == "jitter":
        scores = _jitter(scores, np.random.default_rng([cfg.seed, 0, 9]))
    data = [client_data(cfg, pid, args.clients, device)[0] for pid in range(args.clients)]
    states = [ClientState() for _ in range(args.clients)]
    features = build_features(cfg.features).to(device)
    settings = TrainSettings(
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        objective=cfg.objective,
        estimator=cfg.estimator,
    )
    evaluator = Evaluator(cfg.dataset, cfg.resolved_data_dir(), args.eval_samples, cfg.seed, device=device)
    rounds = []
    t0 = time.perf_counter()
    prev_codes = None  # the last round's grid codes (grid8)
    for rnd in range(1, args.rounds + 1):
        down = delta = 4 * n
        if mode == "grid8":  # full state (new or stale clients), or the change from last round's state
            codes = quantise(scores)
            down = len(pack_scores(codes))
            delta = len(pack_delta(codes, prev_codes)) if rnd > 1 else down
            prev_codes = codes
        cm = mask_model(scores)
        blobs, rec = (
            [],
            {
                "round": rnd,
                "coded_bits": [],
                "ideal_bits": [],
                "exact_theta_bits": [],
                "theta_entropy_bits": [],
                "methods": [],
            },
        )
        for pid in range(args.clients):
            local = ResnetGenerator(spec).to(device)
            set_flat(local, torch.from_numpy(scores.copy()).to(device))
            torch.manual_seed(derive_seed(cfg.seed, rnd, pid, 0))
            gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, rnd, pid, 1))
            metrics = train_local(local, features, data[pid], settings, states[pid], generator=gen)
            thetas = [t.cpu() for t in iter_thetas(local)]
            mask = sample_mask(
                local, thetas, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, rnd, pid, 5))
            ).numpy()
            blob = encode_mask(mask, layout, cm)
            blobs.append(blob)
            rec["coded_bits"].append(8 * len(blob) / n)
            rec["methods"].append(mask_method(blob))
            rec["ideal_bits"].append(_bits(mask, cm.probabilities()))
            rec["exact_theta_bits"].append(_bits(mask, sigmoid(scores)))
            rec["theta_entropy_bits"].append(metrics["theta_entropy_bits"])
        packed = [decode_mask(b, n, layout, cm) for b in blobs]
        counts, k = count_ones(packed, n)
        res = aggregate(
            scores,
            counts,
            k,
            method=cfg.aggregation,
            space=cfg.mada_space,
            rng=np.random.default_rng([cfg.seed, rnd]),
        )
        scores = res.scores
        if mode == "grid8":
            scores = snap_to_grid(scores, np.random.default_rng([cfg.seed, rnd, 8]))
        if mode == "jitter":
            scores = _jitter(scores, np.random.default_rng([cfg.seed, rnd, 9]))
        rec.update(
            {
                "downlink_bits": 8 * down / n,
                "downlink_delta_bits": 8 * delta / n,
                "mada_lambda": res.mada_lambda,
            }
        )
        if rnd % args.eval_every == 0 or rnd == args.rounds:
            set_flat(model, torch.from_numpy(scores.copy()).to(device))
            metrics, _ = evaluator.evaluate(model)
            rec["eval"] = {k: float(v) for k, v in metrics.items()}
        for key in ("coded_bits", "ideal_bits", "exact_theta_bits", "theta_entropy_bits"):
            rec[key + "_mean"] = float(np.mean(rec[key]))
        rec["coded_bits_max"] = float(np.max(rec["coded_bits"]))
        rounds.append(rec)
        print(
            f"[{mode} r{rnd:2d}] up {rec['coded_bits_mean']:.3f} b/w (max {rec['coded_bits_max']:.3f}, "
            f"ideal {rec['ideal_bits_mean']:.3f}, exact-theta {rec['exact_theta_bits_mean']:.3f}, "
            f"H(theta_client) {rec['theta_entropy_bits_mean']:.3f}) | down {rec['downlink_bits']:.3f} b/w "
            f"(delta {rec['downlink_delta_bits']:.3f}) | "
            f"lambda {res.mada_lambda:.3f}"
            + (f" | FD {rec['eval'][evaluator.metric_name]:.1f}" if "eval" in rec else ""),
            flush=True,
        )
    return {
        "mode": mode,
        "weights": n,
        "ngf": args.ngf,
        "clients": args.clients,
        "steps": args.steps,
        "seed": args.seed,
        "metric": evaluator.metric_name,
        "eval_samples": args.eval_samples,
        "wall_s": time.perf_counter() - t0,
        "rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument(
        "--broadcast", nargs="+", default=["float32", "grid8"], choices=["float32", "grid8", "jitter"]
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (as the run-config key)")
    ap.add_argument("--out", type=Path, default=Path("results/bytes"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for mode in args.broadcast:
        res = run(mode, args)
        res["machine"] = (
            torch.cuda.get_device_name()
            if args.device != "cpu" and torch.cuda.is_available()
            else f"2-core CPU ({platform.machine()}), torch threads {torch.get_num_threads()}"
        )
        (args.out / f"bytes-{mode}-ngf{args.ngf}-seed{args.seed}.json").write_text(json.dumps(res, indent=1))
        last = res["rounds"][-1]
        print(
            json.dumps(
                {
                    "bench": "bytes",
                    "mode": mode,
                    "ngf": args.ngf,
                    "weights": res["weights"],
                    "last_round": last["round"],
                    "uplink_bits_per_weight": last["coded_bits_mean"],
                    "downlink_bits_per_weight": last["downlink_bits"],
                    "downlink_delta_bits_per_weight": last["downlink_delta_bits"],
                    "theta_entropy_bits": last["theta_entropy_bits_mean"],
                    "fd": last.get("eval", {}).get(res["metric"]),
                    "wall_s": res["wall_s"],
                }
            )
        )


if __name__ == "__main__":
    main()
