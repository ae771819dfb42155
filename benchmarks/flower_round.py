"""Round time through Flower's deployment engine vs the same round in one process.

    python benchmarks/flower_round.py --nodes 10 --ngf 64 --local-steps 100 --rounds 3

Starts a SuperLink and ``--nodes`` SuperNodes on loopback (insecure, as the deployment test
does; no Ray needed), runs this app with ``flwr run`` for ``--rounds`` rounds (server evaluation
only after the last one, pixel MMD only), and reads the round times from ``history.json`` (the
ServerApp stamps each round's record when it is complete). Then runs the same configuration
in-process (``prism_flwr.inprocess.run``: the same client round and aggregation, clients one
after another on one device). Flower's share of a round = 1 - in-process / through Flower, from
rounds >= 2 (round 1 pays process and CUDA start-up in both). All SuperNodes share the machine's
one GPU when there is one, and its cores: each gets ``OMP_NUM_THREADS = cores // nodes`` unless
the variable is set. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import procs  # noqa: E402
from flowerkit import exe, flower_env, online_nodes, write_connection  # noqa: E402


def through_flower(keys: dict, nodes: int, work: Path, timeout: float) -> list[dict]:
    flwr_home, out, logs = work / "flwr-home", work / "outputs", work / "logs"
    logs.mkdir(parents=True)
    env = flower_env(flwr_home)
    # SuperNodes sharing a machine share its cores: without a thread count each ClientApp's
    # torch/OpenMP takes all of them, and 4 nodes on 2 cores ran 3.6x slower (README).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes)))
    link_port, node_ports = procs.free_port(), procs.free_ports(nodes)
    write_connection(flwr_home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    run_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                          for k, v in {**keys, "output-dir": str(out)}.items())
    with procs.Processes() as ps:
        link = ps.start([exe("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                         "--host", "127.0.0.1", "--port", str(link_port)], env=env, log_path=logs / "superlink.log")
        procs.wait_for_port("127.0.0.1", link_port, timeout=60, procs=[link])
        started = [ps.start([exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--node-config", f"partition-id={i} num-partitions={nodes}"],
                            env=env, log_path=logs / f"supernode-{i}.log") for i, port in enumerate(node_ports)]
        procs.wait_for(lambda: len(online_nodes(env, "loopback")) == nodes, timeout=90,
                       desc=f"{nodes} SuperNodes online", procs=[link, *started])
        run = ps.start([exe("flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", run_config],
                       env=env, log_path=logs / "flwr-run.log", cwd=flwr_home)
        # Report each round as the ServerApp records it, so a run cut short still says something.
        deadline, seen, history = time.time() + timeout, 0, []
        while run.poll() is None and time.time() < deadline:
            time.sleep(1)
            path = out / "latest" / "history.json"  # each run writes into its own folder
            history = json.loads(path.read_text()) if path.is_file() else []
            for a, b in zip(history[seen:], history[seen + 1:]):
                print(f"[flower] round {b['round']} done: {b['time'] - a['time']:.2f} s", flush=True)
            seen = max(seen, len(history) - 1)
        if len(history) < 2:
            print("\n".join(procs.tail(p, 20) for p in sorted(logs.iterdir())), flush=True)
            raise RuntimeError(f"no round finished through Flower within {timeout:.0f} s (logs above)")
    return [{"round": b["round"], "seconds": b["time"] - a["time"]} for a, b in zip(history, history[1:])]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--keep-logs", type=Path, help="copy the SuperLink/SuperNode/run logs here (also on failure)")
    args = p.parse_args(argv)
    keys = {"ngf": args.ngf, "local-steps": args.local_steps, "num-server-rounds": args.rounds,
            "eval-every": args.rounds, "eval-samples": 64, "eval-feature-metrics": False, "fraction-evaluate": 0.0,
            "min-train-nodes": args.nodes}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        try:
            flower = through_flower(keys, args.nodes, Path(tmp), args.timeout)
        finally:
            if args.keep_logs is not None:
                shutil.copytree(Path(tmp) / "logs", args.keep_logs, dirs_exist_ok=True)
        flower_wall = time.time() - t0

    import torch

    from prism_flwr import inprocess
    from prism_flwr.config import RunConfig
    hist = inprocess.run(RunConfig.parse({**keys, "output-dir": "/tmp/unused"}), args.nodes)
    local = [{"round": r["round"], "seconds": r["round_seconds"]} for r in hist[1:]]
    warm_flower = statistics.mean(r["seconds"] for r in flower[1:]) if len(flower) > 1 else flower[0]["seconds"]
    warm_local = statistics.mean(r["seconds"] for r in local[1:]) if len(local) > 1 else local[0]["seconds"]
    out = {"bench": "flower_round", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "nodes": args.nodes, "ngf": args.ngf, "local_steps": args.local_steps,
           "flower_rounds": flower, "inprocess_rounds": local, "flower_wall_seconds": flower_wall,
           "warm_round_flower_s": warm_flower, "warm_round_inprocess_s": warm_local,
           "flower_share": 1 - warm_local / warm_flower}
    print(f"{'round':>5} {'through Flower s':>17} {'in-process s':>13}")
    for f, l in zip(flower, local):
        print(f"{f['round']:>5} {f['seconds']:>17.2f} {l['seconds']:>13.2f}")
    print(f"warm rounds: Flower {warm_flower:.2f} s, in-process {warm_local:.2f} s: Flower's share "
          f"{100 * out['flower_share']:.0f} %")
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
