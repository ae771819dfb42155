"""Quality at a fixed number of steps: two forms of the step side by side, seed by seed.

    python -m experiments.precision_quality [--compare precision|forms] [--seeds 30 31 32]
        [--rounds 2] [--steps 50] [--precision float32]

``--compare precision`` (default): the bf16 step against float32. ``--compare forms``: in
``--precision``, the generator's CPU forms (conv1 of the upsampled input in the phase form, the
head and the image layer as matmuls: ``model/upconv.py``, ``model/matmul_conv.py``) against the
direct forms they replaced (patched back in for the ``direct`` arm); the two compute the same
function and differ only in float rounding.

For each seed the in-process runner (``inprocess.run``: the ClientApp's round and the strategy's
aggregation in one process) trains the default run's shape (4 clients, the run-config defaults,
``--rounds`` x ``--steps``) twice, ``precision = "bf16"`` then ``"float32"``, one thread; the
server's ``Evaluator`` scores the global model after the last round (FD-FMNIST-CNN, precision,
recall, density, coverage on ``--eval-samples`` samples). Both runs of a seed share network,
partition and random streams, the clients' mask secrets included (``insecure_test_mask_seed`` =
the seed), so the pair differs only in the generator's arithmetic. Writes
``<out>/precision-quality-<rounds>x<steps>.json`` and ``.md`` (``forms-quality-<precision>.*`` for
``--compare forms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_flwr.config import RunConfig
from prism_flwr.evaluation.evaluator import Evaluator
from prism_flwr.federated import inprocess
from prism_flwr.model import generator
from prism_flwr.model.precision import cpu_has_bf16
from prism_flwr.threads import configure_threads

CLIENTS = 4
METRICS = ("precision", "recall", "density", "coverage")


@contextlib.contextmanager
def direct_forms():
    """The generator with its CPU forms replaced by the direct ones (upsample then conv, the head's
    transposed conv, oneDNN's image conv): the step as it was before them."""
    saved = generator.phase_pays, generator.head_conv, generator.narrow_pays
    generator.phase_pays = lambda x: False
    generator.head_conv = lambda z, w: F.conv_transpose2d(z.view(z.shape[0], -1, 1, 1), w).contiguous(
        memory_format=torch.channels_last
    )
    generator.narrow_pays = lambda x, w: False
    try:
        yield
    finally:
        generator.phase_pays, generator.head_conv, generator.narrow_pays = saved


def arms(args) -> dict:
    """label -> (precision, a factory of the context its runs go in); the first arm is compared with
    the second."""
    if args.compare == "precision":
        return {"bf16": ("bf16", contextlib.nullcontext), "float32": ("float32", contextlib.nullcontext)}
    return {"phase": (args.precision, contextlib.nullcontext), "direct": (args.precision, direct_forms)}


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


def report(rows: list[dict], args, metric: str, labels: list[str]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    a, b = labels
    what = f"{a} vs {b} step" + ("" if args.compare == "precision" else f" ({args.precision})")
    lines = [
        f"# {what}: quality after {args.rounds} rounds x {args.steps} local steps",
        "",
        f"{CLIENTS} clients, the run-config defaults otherwise (ngf 16, batch 64, pixel MMD, plain mean), "
        f"{args.eval_samples} evaluation samples, one thread on the busy 2-core CPU "
        f"({time.strftime('%Y-%m-%d')}, commit {commit.strip()}). Same seed: same network, partition and "
        "random streams (the mask secrets included).",
        "",
        f"| seed | {metric} {a} | {metric} {b} | {a} - {b} | recall {a} / {b} | client time {a} / {b} |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["seed"], r["arm"]): r for r in rows}
    diffs = []
    for seed in args.seeds:
        x, y = by.get((seed, a)), by.get((seed, b))
        if x is None or y is None:
            continue
        diffs.append(x["eval"][metric] - y["eval"][metric])
        lines.append(
            f"| {seed} | {x['eval'][metric]:.1f} | {y['eval'][metric]:.1f} | {diffs[-1]:+.1f} | "
            f"{x['eval']['recall']:.3f} / {y['eval']['recall']:.3f} | "
            f"{x['client_seconds'] / y['client_seconds']:.2f} |"
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
    ap.add_argument("--compare", choices=("precision", "forms"), default="precision")
    ap.add_argument("--precision", choices=("float32", "bf16"), default="float32", help="for --compare forms")
    ap.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--out", default="results/cpu")
    args = ap.parse_args()
    if "bf16" in (args.compare, args.precision) and not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16 / AMX): nothing to compare")
    configure_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (
        f"precision-quality-{args.rounds}x{args.steps}"
        if args.compare == "precision"
        else f"forms-quality-{args.precision}"
    )
    rows = []
    defaults = RunConfig.parse({})
    runs = arms(args)
    for seed in args.seeds:
        evaluator = Evaluator(defaults.dataset, defaults.resolved_data_dir(), args.eval_samples, seed, "cpu")
        for label, (prec, context) in runs.items():
            with context():
                rows.append({"arm": label, **one(seed, prec, args, evaluator)})
            print(json.dumps(rows[-1]), flush=True)
            (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
        (out / f"{name}.md").write_text(report(rows, args, evaluator.metric_name, list(runs)))
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
