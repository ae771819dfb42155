"""What a fresh ClientApp process pays before it trains, with and without the client cache.

    python -m benchmarks.clientapp_startup                  # Fashion-MNIST, 4 partitions, partition 1
    python -m benchmarks.clientapp_startup --repeats 1 --dataset mnist --data-dir DIR   # the test suite

Flower's deployment engine starts a new ClientApp process for every message (every round's
train and evaluate), so this cost is paid by every client in every round. Each repeat starts a
new Python process (one OpenMP thread, as ``flower_round.py`` gives each of several SuperNodes on
a small machine) that does what ``client_app.py``'s ``_unpack`` does, timed phase by phase:
import torch, import the ClientApp (Flower and this package), read the client's data
(``task.client_data``) and build the frozen network. ``cold``: the client's cache file removed
first, so the process reads the whole dataset, partitions it and writes the file (the cost every
process paid before ``client_cache.py``); ``warm``: the file is there. Cold and warm alternate in
one run. Prints a table (median seconds per phase) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("import torch", "import ClientApp", "client data", "network")
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import client_app
t2 = time.perf_counter()
from prism_flwr.federated.client_round import _model
from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.model.build import generator_spec
cfg = RunConfig.parse(json.loads(sys.argv[1]))
data, hist = client_data(cfg, int(sys.argv[2]), int(sys.argv[3]), torch.device("cpu"))
t3 = time.perf_counter()
_model(generator_spec(cfg), "prism", "cpu")
t4 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3, len(data)]))
"""


def one_process(keys: dict, pid: int, num: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(keys), str(pid), str(num)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"ClientApp start-up failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--data-dir", help="default: the run config's")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--partition-id", type=int, default=1)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from prism_flwr.config import RunConfig
    from prism_flwr.data.client_cache import _key, cache_path

    keys = {
        "dataset": args.dataset,
        "ngf": args.ngf,
        **({"data-dir": args.data_dir} if args.data_dir else {}),
    }
    cfg = RunConfig.parse(keys)
    one_process(keys, args.partition_id, args.partitions)  # dataset prepared (and fetched) outside the timing
    path = cache_path(cfg, _key(cfg, args.partition_id, args.partitions))
    times: dict[str, list[list[float]]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        for mode in times:
            if mode == "cold":
                path.unlink(missing_ok=True)
            times[mode].append(one_process(keys, args.partition_id, args.partitions))
    med = {
        mode: [statistics.median(row[i] for row in rows) for i in range(len(PHASES))]
        for mode, rows in times.items()
    }
    images = int(times["warm"][0][-1])
    print(
        f"ClientApp start-up, fresh process, 1 thread, {args.dataset} partition {args.partition_id}/"
        f"{args.partitions} ({images} images), ngf {args.ngf}, median of {args.repeats}:"
    )
    print(f"{'phase':>18} {'cold s':>8} {'warm s':>8}")
    for i, phase in enumerate(PHASES):
        print(f"{phase:>18} {med['cold'][i]:>8.2f} {med['warm'][i]:>8.2f}")
    total = {mode: sum(v) for mode, v in med.items()}
    print(
        f"{'total':>18} {total['cold']:>8.2f} {total['warm']:>8.2f}   ({total['cold'] / total['warm']:.1f}x)"
    )
    out = {
        "bench": "clientapp_startup",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "dataset": args.dataset,
        "images": images,
        "ngf": args.ngf,
        "repeats": args.repeats,
        "phases": list(PHASES),
        "cold_s": med["cold"],
        "warm_s": med["warm"],
        "total_cold_s": total["cold"],
        "total_warm_s": total["warm"],
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
