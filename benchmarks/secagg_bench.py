"""Secure aggregation of binary masks: time per client and server phase, bytes per client.

    python benchmarks/secagg_bench.py [--case NGF:K ...] [--drop-after-share D] [--repeats R]

Each case is a generator width (n = its number of masked weights) and a number of clients K,
on the complete graph (k = K - 1, t = floor(k / 2) + 1, b = ceil(log2(K + 1))). Every party runs
in this process, one after the other; client times are the mean over clients, server times the
whole phase, each the best of `--repeats` rounds. `--drop-after-share D` lets D clients go silent
after sharing keys (the server then rebuilds their masking keys and pairwise masks). Bytes count
the protocol's own fields (bytes as is, 8 per integer), not a transport's framing. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime

import numpy as np

from prism_flwr.secagg import (
    advertise_keys,
    collect_adverts,
    collect_masked,
    finish,
    mask_input,
    new_round,
    route_shares,
    share_keys,
    start_round,
    unmask,
)

CLIENT_PHASES = ("advertise", "share", "mask", "unmask")
SERVER_PHASES = ("adverts", "route", "collect", "finish")


def wire_bytes(value) -> int:
    """Size of a message's fields: bytes as is, 8 per integer, containers summed."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, int):
        return 8
    if isinstance(value, dict):
        return sum(wire_bytes(k) + wire_bytes(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sum(wire_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(wire_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    raise TypeError(f"no wire size for {type(value).__name__}")


def masked_weights(ngf: int) -> int:
    """n for a generator width, from the model itself (torch is imported only here)."""
    from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
    from prism_flwr.model.masked import num_masked

    return num_masked(ResnetGenerator(GeneratorSpec(ngf=ngf, nc=1)))


def git_commit() -> str | None:
    """The checkout's commit, so a result says what code produced it."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def timed(times: dict, key: str, fn):
    start = time.perf_counter()
    out = fn()
    times[key] = times.get(key, 0.0) + time.perf_counter() - start
    return out


def one_round(inputs: dict, threshold: int, degree: int, silent: set) -> tuple[dict, dict, dict]:
    """Run one round; returns (client seconds summed over clients, server seconds, bytes)."""
    n = len(next(iter(inputs.values())))
    params = new_round(inputs, threshold, degree, n)
    client_s, server_s, up, down = {}, {}, {}, {}
    server, states = start_round(params), {}

    def clients(nodes, phase, step, received):
        replies = []
        for u in nodes:
            states[u], reply = timed(client_s, phase, lambda: step(u))
            up[phase] = up.get(phase, 0) + wire_bytes(reply)
            down[phase] = down.get(phase, 0) + wire_bytes(received(u))
            replies.append(reply)
        return replies

    adverts = clients(params.clients, "advertise", lambda u: advertise_keys(params, u), lambda u: params)
    server, forward = timed(server_s, "adverts", lambda: collect_adverts(server, adverts))
    packages = clients(forward, "share", lambda u: share_keys(states[u], forward[u]), lambda u: forward[u])
    server, inbox = timed(server_s, "route", lambda: route_shares(server, packages))
    masked = clients(
        [u for u in inbox if u not in silent],
        "mask",
        lambda u: mask_input(states[u], inbox[u], inputs[u]),
        lambda u: inbox[u],
    )
    server, request = timed(server_s, "collect", lambda: collect_masked(server, masked))
    replies = clients(request.survivors, "unmask", lambda u: unmask(states[u], request), lambda u: request)
    result = timed(server_s, "finish", lambda: finish(server, replies))
    plain = sum(inputs[u].astype(np.int64) for u in result.contributors)
    if not np.array_equal(result.counts, plain):
        raise SystemExit("secure aggregate differs from the plain count")
    counts = {"advertise": len(adverts), "share": len(packages), "mask": len(masked), "unmask": len(replies)}
    per_client = {p: client_s[p] / counts[p] for p in CLIENT_PHASES}
    size = {p: {"up": up[p] / counts[p], "down": down[p] / counts[p]} for p in CLIENT_PHASES}
    return per_client, server_s, {"bits": params.bits, "per_phase": size}


def run_case(ngf: int, count: int, silent_count: int, repeats: int) -> dict:
    n = masked_weights(ngf)
    degree = count - 1
    threshold = degree // 2 + 1
    rng = np.random.default_rng(0)
    inputs = {1000 + i: rng.integers(0, 2, n, dtype=np.uint8) for i in range(count)}
    silent = set(sorted(inputs)[:silent_count])
    best_client, best_server, size = None, None, None
    for _ in range(repeats):
        client_s, server_s, size = one_round(inputs, threshold, degree, silent)
        best_client = (
            client_s if best_client is None else {p: min(best_client[p], client_s[p]) for p in CLIENT_PHASES}
        )
        best_server = (
            server_s if best_server is None else {p: min(best_server[p], server_s[p]) for p in SERVER_PHASES}
        )
    up = sum(s["up"] for s in size["per_phase"].values())
    down = sum(s["down"] for s in size["per_phase"].values())
    return {
        "ngf": ngf,
        "n": n,
        "clients": count,
        "degree": degree,
        "threshold": threshold,
        "bits": size["bits"],
        "silent_after_share": silent_count,
        "client_s": best_client,
        "server_s": best_server,
        "client_bytes": {"up": up, "down": down, "per_phase": size["per_phase"]},
        "plain_mask_bytes": (n + 7) // 8,
        "masked_vector_bytes": (n * size["bits"] + 7) // 8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--case", action="append", default=None, help="NGF:K, e.g. 16:4 (default: 16:4 and 64:10)"
    )
    parser.add_argument("--drop-after-share", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cases = [tuple(map(int, c.split(":"))) for c in (args.case or ["16:4", "64:10"])]
    rows = [run_case(ngf, k, args.drop_after_share, args.repeats) for ngf, k in cases]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"# secagg_bench at {git_commit()} on {machine} (load {load:.2f}), best of {args.repeats}, "
        f"{args.drop_after_share} client(s) silent after sharing keys"
    )
    print(
        f"{'ngf':>4} {'n':>10} {'K':>3} {'b':>2} | client ms: {'adv':>6} {'share':>6} "
        f"{'mask':>7} {'unmask':>6} | server ms: {'adv':>5} {'route':>5} {'collect':>7} "
        f"{'finish':>7} | client kB up/down (packed mask alone)"
    )
    for r in rows:
        c, s, b = r["client_s"], r["server_s"], r["client_bytes"]
        print(
            f"{r['ngf']:>4} {r['n']:>10,} {r['clients']:>3} {r['bits']:>2} | "
            f"{'':>11}{c['advertise'] * 1e3:>6.1f} {c['share'] * 1e3:>6.1f} "
            f"{c['mask'] * 1e3:>7.1f} {c['unmask'] * 1e3:>6.1f} | {'':>11}"
            f"{s['adverts'] * 1e3:>5.1f} {s['route'] * 1e3:>5.1f} {s['collect'] * 1e3:>7.1f} "
            f"{s['finish'] * 1e3:>7.1f} | {b['up'] / 1e3:,.1f} / {b['down'] / 1e3:,.1f} "
            f"({r['masked_vector_bytes'] / 1e3:,.1f}; 1-bit plain {r['plain_mask_bytes'] / 1e3:,.1f})"
        )
    date = datetime.now(UTC).isoformat(timespec="seconds")
    print(
        json.dumps(
            {
                "bench": "secagg",
                "date": date,
                "commit": git_commit(),
                "machine": machine,
                "load_1min": load,
                "repeats": args.repeats,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
