"""Round time through Flower (deployment engine, Ray simulation) vs the same round in one process.

    python -m benchmarks.flower_round --nodes 10 --ngf 64 --local-steps 100 --rounds 3
    python -m benchmarks.flower_round --nodes 4 --ngf 16 --engines deployment warm warm-poll simulation

``deployment``: a SuperLink and ``--nodes`` SuperNodes on loopback (insecure, as the deployment
test does; no Ray needed); every round starts one ClientApp process per node. ``warm``: the same
SuperNodes with ``--isolation process``, each served by one ``prism-flwr clientapp-executor``
that keeps one ClientApp process for every round (prism_flwr/deployment/executor.py);
``warm-poll``: as ``warm``, the SuperNodes started through ``prism-flwr supernode --idle-poll``
(Flower's SuperNode with its 3 s idle wait capped at ``--idle-poll`` seconds). ``simulation``: a
SuperLink with ``--simulation`` and ``num-supernodes = --nodes`` on Ray workers (each worker
``cores // nodes`` CPUs, or ``--gpus-per-client`` of the GPU), which live for the whole run.
Either way this app runs with ``flwr run`` for ``--rounds`` rounds (server evaluation only after
the last one, pixel MMD only), and the round times come from ``history.json`` (the ServerApp
stamps each round's record when it is complete). Then the same configuration runs in-process
(``prism_flwr.federated.inprocess.run``: the same client round and aggregation, clients one after another
on one device). Flower's share of a round = 1 - in-process / through Flower, from rounds >= 2
(round 1 pays process and CUDA start-up in both). All clients share the machine's one GPU when
there is one, and its cores: each SuperNode gets ``OMP_NUM_THREADS = cores // nodes`` unless the
variable is set. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tools import procs
from tools.flowerkit import (
    exe,
    flower_env,
    online_nodes,
    start_executor,
    start_superlink,
    start_supernode,
    write_connection,
)

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("deployment", "warm", "warm-poll", "simulation")


def through_flower(
    keys: dict,
    nodes: int,
    work: Path,
    timeout: float,
    engine: str = "deployment",
    gpus_per_client: float = 0.0,
    idle_poll: float = 0.2,
) -> list[dict]:
    flwr_home, out, logs = work / "flwr-home", work / "outputs", work / "logs"
    logs.mkdir(parents=True)
    env = flower_env(flwr_home)
    # SuperNodes sharing a machine share its cores: without a thread count each ClientApp's
    # torch/OpenMP takes all of them, and 4 nodes on 2 cores ran 3.6x slower (docs/benchmarks.md).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes)))
    link_port, node_ports = procs.free_port(), procs.free_ports(nodes)
    write_connection(flwr_home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    run_config = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in {**keys, "output-dir": str(out)}.items()
    )
    federation = []
    with procs.Processes() as ps:
        sim = (
            ["--simulation", "--isolation", "subprocess", "--database", str(work / "state.db")]
            if engine == "simulation"
            else []
        )
        link = start_superlink(ps, link_port, env, logs / "superlink.log", extra=tuple(sim))
        if engine == "simulation":  # Ray workers, each hosting clients one after another
            cpus = max(1, (os.cpu_count() or 1) // nodes) if not gpus_per_client else 1
            federation = [
                "--federation-config",
                f"num-supernodes={nodes} client-resources-num-cpus={cpus} "
                f"client-resources-num-gpus={gpus_per_client}",
            ]
        else:
            warm = engine in ("warm", "warm-poll")
            started = [
                start_supernode(
                    ps,
                    f"127.0.0.1:{link_port}",
                    port,
                    env,
                    logs / f"supernode-{i}.log",
                    cwd=ROOT,
                    node_config=f"partition-id={i} num-partitions={nodes}",
                    isolation="process" if warm else None,
                    idle_poll=idle_poll if engine == "warm-poll" else None,
                )
                for i, port in enumerate(node_ports)
            ]
            if warm:  # one warm ClientApp process per SuperNode, serving every round
                for i, port in enumerate(node_ports):
                    procs.wait_for_port("127.0.0.1", port, timeout=60, procs=started)
                    started.append(start_executor(ps, port, env, logs / f"executor-{i}.log", cwd=ROOT))
            procs.wait_for(
                lambda: len(online_nodes(env, "loopback")) == nodes,
                timeout=90,
                desc=f"{nodes} SuperNodes online",
                procs=[link, *started],
            )
        run = ps.start(
            [exe("flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", run_config, *federation],
            env=env,
            log_path=logs / "flwr-run.log",
            cwd=flwr_home,
        )
        # Report each round as the ServerApp records it, so a run cut short still says something.
        deadline, seen, history = time.time() + timeout, 0, []
        while run.poll() is None and time.time() < deadline:
            time.sleep(1)
            path = out / "latest" / "history.json"  # each run writes into its own folder
            history = json.loads(path.read_text()) if path.is_file() else []
            for a, b in zip(history[seen:], history[seen + 1 :]):
                print(f"[flower] round {b['round']} done: {b['time'] - a['time']:.2f} s", flush=True)
            seen = max(seen, len(history) - 1)
        if len(history) < 2:
            print("\n".join(procs.tail(p, 20) for p in sorted(logs.iterdir())), flush=True)
            raise RuntimeError(f"no round finished through Flower within {timeout:.0f} s (logs above)")
    return [{"round": b["round"], "seconds": b["time"] - a["time"]} for a, b in zip(history, history[1:])]


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=["deployment"])
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="simulation: client-resources-num-gpus")
    p.add_argument("--idle-poll", type=float, default=0.2, help="warm-poll: the SuperNodes' longest wait (s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per engine")
    p.add_argument(
        "--keep-logs", type=Path, help="copy the SuperLink/SuperNode/run logs here (also on failure)"
    )
    args = p.parse_args(argv)
    keys = {
        "ngf": args.ngf,
        "local-steps": args.local_steps,
        "num-server-rounds": args.rounds,
        "eval-every": args.rounds,
        "eval-samples": 64,
        "eval-feature-metrics": False,
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.nodes,
    }
    flower: dict[str, list[dict]] = {}
    for engine in args.engines:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                flower[engine] = through_flower(
                    keys, args.nodes, Path(tmp), args.timeout, engine, args.gpus_per_client, args.idle_poll
                )
            finally:
                if args.keep_logs is not None:
                    shutil.copytree(Path(tmp) / "logs", args.keep_logs / engine, dirs_exist_ok=True)

    import torch

    from prism_flwr.config import RunConfig
    from prism_flwr.federated import inprocess

    hist = inprocess.run(RunConfig.parse({**keys, "output-dir": "/tmp/unused"}), args.nodes)
    local = [{"round": r["round"], "seconds": r["round_seconds"]} for r in hist[1:]]

    def warm(rounds: list[dict]) -> float:  # round 1 pays process and CUDA start-up
        return statistics.mean(r["seconds"] for r in (rounds[1:] if len(rounds) > 1 else rounds))

    shares = {engine: 1 - warm(local) / warm(rounds) for engine, rounds in flower.items()}
    out = {
        "bench": "flower_round",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cores": os.cpu_count(),
        "threads_per_client": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "nodes": args.nodes,
        "ngf": args.ngf,
        "local_steps": args.local_steps,
        "idle_poll_s": args.idle_poll if "warm-poll" in flower else None,
        "flower_rounds": flower,
        "inprocess_rounds": local,
        "inprocess_threads": torch.get_num_threads(),
        "warm_round_flower_s": {e: warm(r) for e, r in flower.items()},
        "warm_round_inprocess_s": warm(local),
        "flower_share": shares,
    }
    print(f"{'round':>5} " + " ".join(f"{e + ' s':>14}" for e in flower) + f" {'in-process s':>13}")
    for i, loc in enumerate(local):
        print(
            f"{loc['round']:>5} "
            + " ".join(f"{r[i]['seconds'] if i < len(r) else float('nan'):>14.2f}" for r in flower.values())
            + f" {loc['seconds']:>13.2f}"
        )
    for engine, share in shares.items():
        print(
            f"warm rounds, {engine}: {warm(flower[engine]):.2f} s through Flower vs {warm(local):.2f} s in one "
            f"process: Flower's share {100 * share:.0f} %"
        )
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
