"""Where a ClientApp process's memory goes, phase by phase, for one message of the default run.

    python -m benchmarks.client_memory                      # fmnist, 2 partitions, partition 0, ngf 16
    python -m benchmarks.client_memory --data-dir DIR --partitions 4 --message evaluate

Flower's deployment engine answers every message in a fresh ClientApp process, so its peak is what
a node's memory limit must hold. One fresh process per message kind (1 OpenMP thread, a fresh
state-dir) does what such a process does, in order: import torch, import Flower's ClientApp API,
import the app (client_app.py and this package), read this node's partition (``client_data``: the
client cache, built first in a separate process, or by this one with ``--cold``), build the
frozen network, then answer one message the way the server sends it (``client_app.train`` or
``client_app.evaluate`` on a real ``Message``). After each phase it records its resident set
(RSS, /proc statm), its peak so far (VmHWM), its anonymous and file-backed parts (RssAnon,
RssFile: file pages the kernel may drop under a memory limit and read again) and the largest
anonymous part seen during the phase (sampled every 5 ms). Reported: "over torch + Flower" =
peak - RSS after importing torch and Flower, the figure the node budget is about; and which heavy
modules the process imported (torchvision, datasets, pandas, matplotlib, scipy). Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prism_flwr.data.client_cache import CACHE_FOLDER

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torchvision", "datasets", "pandas", "matplotlib", "scipy", "flwr_datasets", "opacus", "sklearn")

CHILD = r"""
import json, os, sys, threading, time
def status():
    return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(("VmHWM", "RssAnon", "RssFile"))}
top = {"RssAnon": 0.0, "RssFile": 0.0}
def sample():  # the largest anonymous and file-backed parts seen since the last phase, every 5 ms
    while True:
        now = status()
        for key in top:
            top[key] = max(top[key], now[key])
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
def mem():
    page = os.sysconf("SC_PAGE_SIZE")
    rss = int(open("/proc/self/statm").read().split()[1]) * page
    now = status()
    row = (rss / 2**20, now["VmHWM"], now["RssAnon"], now["RssFile"], max(top["RssAnon"], now["RssAnon"]), max(top["RssFile"], now["RssFile"]))
    top.update(RssAnon=0.0, RssFile=0.0)
    return row
rows = [("python",) + mem()]
kind, keys, pid, num, heavy = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
import torch
rows.append(("import torch",) + mem())
import flwr.app, flwr.clientapp
rows.append(("import Flower",) + mem())
import client_app
rows.append(("import the app",) + mem())
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.federated.client_round import masked_count
from prism_flwr.federated.methods import method_for
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_flat
from tools.security_probe import message, set_task_identity
cfg = RunConfig.parse(keys)
data, hist = client_data(cfg, pid, num, torch.device("cpu"))
n_images = len(data)
del data
rows.append(("client data",) + mem())
method = method_for(cfg)
masked_count(cfg, method, torch.device("cpu"))
rows.append(("network",) + mem())
downlink = method.downlink(cfg)
vector = downlink.settle(get_flat(ResnetGenerator(generator_spec(cfg)), method.vector_attr).numpy())
content = RecordDict({"config": ConfigRecord({"server-round": 1, "run-tag": "aaaa0001"}),
                      method.down_key: ArrayRecord({method.down_key: Array(downlink.encode(vector))})})
del vector
set_task_identity()
node = {"partition-id": pid, "num-partitions": num, "data-dir": keys["data-dir"], "state-dir": sys.argv[6]}
context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=keys)
t0 = time.perf_counter()
reply = getattr(client_app, kind)(message(0, content, kind=kind), context)
seconds = time.perf_counter() - t0
assert reply.content is not None
rows.append((kind + " message",) + mem())
print(json.dumps({"rows": rows, "images": n_images, "seconds": seconds,
                  "imported": [m for m in heavy if m in sys.modules]}))
"""


def run_child(kind: str, keys: dict, pid: int, num: int, state_dir: Path) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            kind,
            json.dumps(keys),
            str(pid),
            str(num),
            ",".join(HEAVY),
            str(state_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path("~/.cache/prism-flwr/data").expanduser()))
    p.add_argument("--state-dir", default="/tmp/prism-client-memory-state")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--partition-id", type=int, default=0)
    p.add_argument("--message", choices=("train", "evaluate", "both"), default="both")
    p.add_argument("--run-config", default="{}", help="JSON of further run-config keys")
    p.add_argument("--cold", action="store_true", help="no client cache: the measured process builds it")
    args = p.parse_args(argv)
    keys = {
        "dataset": args.dataset,
        "data-dir": args.data_dir,
        "download": False,
        **json.loads(args.run_config),
    }
    kinds = ("train", "evaluate") if args.message == "both" else (args.message,)
    # The node's cache file is built once by a separate process, as the node's first message does.
    prep = [sys.executable, "-c", "import json, sys, torch; from prism_flwr.config import RunConfig; "
            "from prism_flwr.data.client_cache import client_images; "
            "client_images(RunConfig.parse(json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]))",
            json.dumps(keys), str(args.partition_id), str(args.partitions)]  # fmt: skip
    subprocess.run(prep, cwd=ROOT, check=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = {}
    for kind in kinds:
        if args.cold:
            for path in (Path(args.data_dir) / CACHE_FOLDER).glob(f"{args.dataset}-*"):
                path.unlink()
        # a fresh state-dir per process: a node that has answered round 1 would resend its answer
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        state = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=args.state_dir))
        try:
            results[kind] = run_child(kind, keys, args.partition_id, args.partitions, state)
        finally:
            shutil.rmtree(state, ignore_errors=True)

    import torch

    first = next(iter(results.values()))
    print(
        f"ClientApp memory, fresh process per message, 1 thread: {args.dataset} partition "
        f"{args.partition_id}/{args.partitions} ({first['images']} images, client cache "
        f"{'built by the process' if args.cold else 'ready'}), run config {keys} "
        f"(defaults otherwise), torch {torch.__version__}, {platform.machine()}"
    )
    head = " ".join(f"{k + ' ' + c:>14}" for k in kinds for c in ("RSS", "peak", "anon", "file", "anon max"))
    print(f"{'phase':>18} {head}   (MiB)")
    for i, row in enumerate(first["rows"]):
        cells = " ".join(f"{v:>14.0f}" for k in kinds for v in results[k]["rows"][i][1:6])
        print(f"{row[0]:>18} {cells}")
    summary = {}
    for k in kinds:
        rows = results[k]["rows"]
        base = rows[2][1]  # RSS after import torch + Flower
        summary[k] = {
            "peak_mib": rows[-1][2],
            "torch_flower_mib": base,
            "over_torch_flower_mib": rows[-1][2] - base,
            # the largest anonymous part seen over the whole process, above that after torch + Flower
            "anon_over_torch_flower_mib": max(r[5] for r in rows) - rows[2][3],
            "seconds": results[k]["seconds"],
            "imported": results[k]["imported"],
        }
        print(
            f"{k}: peak {rows[-1][2]:.0f} MiB = torch + Flower {base:.0f} + {rows[-1][2] - base:.0f} MiB "
            f"(anonymous memory at most {summary[k]['anon_over_torch_flower_mib']:.0f} MiB above its "
            f"{rows[2][3]:.0f} after torch + Flower); "
            f"message answered in {results[k]['seconds']:.1f} s; heavy modules imported: "
            f"{', '.join(results[k]['imported']) or 'none'}"
        )
    out = {
        "bench": "client_memory",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "dataset": args.dataset,
        "partition": [args.partition_id, args.partitions],
        "cache": "cold" if args.cold else "warm",
        "images": first["images"],
        "run_config": keys,
        "phases": [r[0] for r in first["rows"]],
        "rows": {k: results[k]["rows"] for k in kinds},
        "summary": summary,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
