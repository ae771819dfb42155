"""``prism-flwr`` command line: data preparation, sampling from an exported model, run status.

    prism-flwr data fmnist [--data-dir DIR] [--download]   prepare / check a dataset
    prism-flwr sample MODEL.prism [--n 64] [--out grid.png] [--seed 0]
    prism-flwr last-run                                    status of the newest `flwr run`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .config import RunConfig
from .data import DATASETS, load_dataset


def _data(args: argparse.Namespace) -> int:
    data = load_dataset(args.dataset, args.data_dir, train=True, download=args.download)
    print(f"{args.dataset}: {len(data)} training images {tuple(data.images.shape[1:])} ready in {args.data_dir}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .evaluation import generate, save_grid
    from .export import load_sparse_model

    model, header = load_sparse_model(args.model)
    save_grid(generate(model, args.n, args.seed), args.out)
    print(f"{args.n} samples of {args.model} ({header['generator']}) -> {args.out}")
    return 0


def _last_run(_: argparse.Namespace) -> int:
    """Flower's `flwr run` exits 0 even when the ServerApp raised: read the run's own status."""
    out = subprocess.run(["flwr", "ls", "--format", "json"], capture_output=True, text=True, check=False)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        print(f"could not read `flwr ls`: {out.stdout or out.stderr}", file=sys.stderr)
        return 2
    last = max(runs, key=lambda r: r["pending-at"])
    print(f"run {last['run-id']}: {last['status']}" + (f" ({last['status-details']})" if last["status-details"] != "N/A" else ""))
    return 0 if last["status"] == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prism-flwr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data", help="prepare or check a dataset")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--data-dir", default=RunConfig().data_dir)
    p.add_argument("--download", action="store_true", help="allow torchvision to download (needs the internet)")
    p.set_defaults(fn=_data)
    p = sub.add_parser("sample", help="sample a grid PNG from an exported model")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_sample)
    p = sub.add_parser("last-run", help="status of the newest Flower run; exit 1 unless it completed")
    p.set_defaults(fn=_last_run)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
