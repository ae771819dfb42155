"""One run of this app through Flower's deployment engine on loopback, its history kept.

    python -m experiments.deployment_history --nodes 2 --out results/x.json \
        --run-config "num-server-rounds=3 ngf=4 local-steps=3"
    python -m experiments.deployment_history --compare results/a.json results/b.json

A SuperLink and ``--nodes`` SuperNodes start on loopback (insecure), ``flwr run`` runs this
repository with ``--run-config`` on top of the pyproject defaults, and ``--out`` receives one JSON
file: the run config, ``history.json`` and the sha256 of the final global state (the newest
checkpoint's scores). ``--compare`` checks two such files describe the same run: the same final
state bit for bit and the same history, apart from wall-clock times, node ids (random per
SuperNode), float sums whose order follows the replies' arrival (relative 1e-9) and the messages'
envelopes (``*_wire_bytes``: each carries the run id and node ids, random 64-bit integers whose
varint length varies from run to run, up to ``ENVELOPE_SLACK`` bytes per message). The per-round
wire bytes (``wire_bits_per_weight_up/down``: bits per weight, per client and round, as Flower
serialises the messages) come out as a table and one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from tools import procs
from tools.flowerkit import (
    REPO,
    exe,
    flower_env,
    online_nodes,
    start_superlink,
    start_supernode,
    write_connection,
)

IGNORED = {"time"}  # wall-clock
PER_NODE = {"dp_epsilon_per_client", "label_histograms"}  # keyed by random node ids: values compared
# serialised message bytes (and the bits per weight derived from them): messages counted
ENVELOPE = {
    "uplink_wire_bytes": "clients",
    "downlink_wire_bytes": "asked",
    "wire_bits_per_weight_up": None,
    "wire_bits_per_weight_down": None,
}
ENVELOPE_SLACK = 20  # bytes per message: run id, node ids and message ids as varints


def run(run_config: str, nodes: int, work: Path, timeout: float) -> dict:
    """Start the federation, run the app, return its history and final state digest."""
    home, out, logs = work / "flwr-home", work / "outputs", work / "logs"
    logs.mkdir(parents=True)
    env = flower_env(home)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes)))
    link_port, node_ports = procs.free_port(), procs.free_ports(nodes)
    write_connection(home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    with procs.Processes() as ps:
        link = start_superlink(ps, link_port, env, logs / "superlink.log")
        started = [
            start_supernode(
                ps,
                f"127.0.0.1:{link_port}",
                port,
                env,
                logs / f"supernode-{i}.log",
                node_config=f"partition-id={i} num-partitions={nodes}",
            )
            for i, port in enumerate(node_ports)
        ]
        procs.wait_for(
            lambda: len(online_nodes(env, "loopback")) == nodes,
            timeout=90,
            desc=f"{nodes} SuperNodes online",
            procs=[link, *started],
        )
        proc = ps.start(
            [
                exe("flwr"),
                "run",
                str(REPO),
                "loopback",
                "--stream",
                "--run-config",
                f"{run_config} output-dir='{out}'",
            ],
            env=env,
            log_path=logs / "flwr-run.log",
            cwd=home,
        )
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        summary = out / "latest" / "summary.json"
        if not summary.is_file():
            print("\n".join(procs.tail(p, 30) for p in sorted(logs.iterdir())), flush=True)
            raise RuntimeError(f"the run did not finish within {timeout:.0f} s (logs above)")
    from prism_flwr.storage.checkpoint import load_checkpoint

    scores = load_checkpoint(out / "latest")["scores"].numpy()
    return {
        "run_config": run_config,
        "nodes": nodes,
        "history": json.loads((out / "latest" / "history.json").read_text()),
        "final_state_sha256": hashlib.sha256(scores.tobytes()).hexdigest(),
    }


def _same(a: object, b: object, where: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in IGNORED:
                continue
            if key not in a or key not in b:
                diffs.append(f"{where}.{key}: only in {'first' if key in a else 'second'}")
            elif key in ENVELOPE:
                count = ENVELOPE[key]
                if count is not None and abs(a[key] - b[key]) > ENVELOPE_SLACK * a.get(count, 1):
                    diffs.append(f"{where}.{key}: {a[key]!r} vs {b[key]!r} (beyond the envelope's slack)")
            elif key in PER_NODE:
                _same(sorted(a[key].values()), sorted(b[key].values()), f"{where}.{key}", diffs)
            else:
                _same(a[key], b[key], f"{where}.{key}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", diffs)
    elif isinstance(a, float) and isinstance(b, float):
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            diffs.append(f"{where}: {a!r} vs {b!r}")
    elif a != b:
        diffs.append(f"{where}: {a!r} vs {b!r}")


def compare(first: dict, second: dict) -> list[str]:
    """Differences between two runs (empty: the same run)."""
    diffs: list[str] = []
    if first["final_state_sha256"] != second["final_state_sha256"]:
        diffs.append("final global state differs")
    _same(first["history"], second["history"], "history", diffs)
    return diffs


def bytes_table(result: dict) -> dict:
    """Wire bits per weight per client and round, both ways, for every trained round."""
    rows = [r for r in result["history"] if r["round"] >= 1 and "wire_bits_per_weight_up" in r]
    print(f"{'round':>5} {'up b/w':>8} {'down b/w':>9} {'total':>7}")
    for r in rows:
        down = r.get("wire_bits_per_weight_down") or float("nan")
        print(
            f"{r['round']:>5} {r['wire_bits_per_weight_up']:>8.3f} {down:>9.3f} "
            f"{r['wire_bits_per_weight_up'] + down:>7.3f}"
        )
    return {
        r["round"]: {"up": r["wire_bits_per_weight_up"], "down": r.get("wire_bits_per_weight_down")}
        for r in rows
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", default="")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--compare", nargs=2, type=Path)
    args = p.parse_args(argv)
    if args.compare:
        diffs = compare(*(json.loads(path.read_text()) for path in args.compare))
        print("\n".join(diffs) or "same run: identical final state and history (times and node ids aside)")
        print(
            json.dumps(
                {"compare": [str(x) for x in args.compare], "same": not diffs, "differences": len(diffs)}
            )
        )
        raise SystemExit(1 if diffs else 0)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.run_config, args.nodes, Path(tmp), args.timeout)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result.update(
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        commit=commit,
        machine=f"{os.cpu_count()}-core CPU ({platform.machine()})",
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    per_round = bytes_table(result)
    print(
        json.dumps(
            {
                "experiment": "deployment_history",
                "machine": result["machine"],
                "commit": commit,
                "nodes": args.nodes,
                "run_config": args.run_config,
                "wire_bits_per_weight": per_round,
            }
        )
    )


if __name__ == "__main__":
    main()
