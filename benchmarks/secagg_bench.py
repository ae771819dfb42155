"""Secure aggregation of binary masks: time per client and server phase, bytes per client.

    python -m benchmarks.secagg_bench [--case NGF:K ...] [--drop-after-share D] [--repeats R]

Each case is a generator width (n = its number of masked weights) and a number of clients K,
on the complete graph (k = K - 1, t = floor(k / 2) + 1, b = ceil(log2(K + 1))). Every party runs
in this process, one after the other; client times are the mean over clients, server times the
whole phase, each the best of `--repeats` rounds. `--drop-after-share D` lets D clients go silent
after sharing keys (the server then rebuilds their masking keys and pairwise masks). Each case runs
twice, side by side: unauthenticated nodes (the honest-server protocol) and nodes with a signing
key and the roster (signed adverts, the consistency round; Bell et al.'s malicious-server
variant). Bytes count the protocol's own fields (bytes as is, 8 per integer), not a transport's
framing. Prints a table and one JSON line.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from prism_flwr.secagg import (
    Identity,
    Trust,
    advertise_keys,
    collect_adverts,
    collect_confirmations,
    collect_masked,
    confirm,
    finish,
    mask_input,
    new_round,
    route_shares,
    share_keys,
    skip_confirmation,
    start_round,
    unmask,
)

CLIENT_PHASES = ("advertise", "share", "mask", "confirm", "unmask")
SERVER_PHASES = ("adverts", "route", "collect", "confirm", "finish")


def signed_trusts(nodes) -> dict:
    """Every node with its own Ed25519 key and the roster of all of them."""
    keys = {u: Ed25519PrivateKey.generate() for u in nodes}
    roster = frozenset(k.public_key().public_bytes_raw() for k in keys.values())
    return {u: Trust(Identity(k.private_bytes_raw(), roster)) for u, k in keys.items()}


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


def one_round(
    inputs: dict, threshold: int, degree: int, silent: set, trusts: dict
) -> tuple[dict, dict, dict]:
    """Run one round; returns (client seconds per client, server seconds, bytes per client)."""
    n = len(next(iter(inputs.values())))
    params = new_round(inputs, threshold, degree, n)
    client_s, server_s, up, down = {p: 0.0 for p in CLIENT_PHASES}, {p: 0.0 for p in SERVER_PHASES}, {}, {}
    server, states, trust = start_round(params), {}, lambda u: trusts.get(u, Trust())

    def clients(nodes, phase, step, received):
        replies = []
        for u in nodes:
            states[u], reply = timed(client_s, phase, lambda: step(u))
            up[phase] = up.get(phase, 0) + wire_bytes(reply)
            down[phase] = down.get(phase, 0) + wire_bytes(received(u))
            replies.append(reply)
        return replies

    adverts = clients(
        params.clients, "advertise", lambda u: advertise_keys(params, u, trust(u)), lambda u: params
    )
    server, forward = timed(server_s, "adverts", lambda: collect_adverts(server, adverts))
    packages = clients(
        forward, "share", lambda u: share_keys(states[u], forward[u], trust(u)), lambda u: forward[u]
    )
    server, inbox = timed(server_s, "route", lambda: route_shares(server, packages))
    masked = clients(
        [u for u in inbox if u not in silent],
        "mask",
        lambda u: mask_input(states[u], inbox[u], inputs[u]),
        lambda u: inbox[u],
    )
    server, survivors = timed(server_s, "collect", lambda: collect_masked(server, masked))
    confirmations = []
    if server.signed:
        confirmations = clients(
            survivors.survivors,
            "confirm",
            lambda u: confirm(states[u], survivors, trust(u)),
            lambda u: survivors,
        )
        server, requests = timed(server_s, "confirm", lambda: collect_confirmations(server, confirmations))
    else:
        server, requests = timed(server_s, "confirm", lambda: skip_confirmation(server))
    replies = clients(
        requests, "unmask", lambda u: unmask(states[u], requests[u], trust(u)), lambda u: requests[u]
    )
    result = timed(server_s, "finish", lambda: finish(server, replies))
    plain = sum(inputs[u].astype(np.int64) for u in result.contributors)
    if not np.array_equal(result.counts, plain):
        raise SystemExit("secure aggregate differs from the plain count")
    counts = {
        "advertise": len(adverts),
        "share": len(packages),
        "mask": len(masked),
        "confirm": len(confirmations),
        "unmask": len(replies),
    }
    per_client = {p: client_s[p] / max(counts[p], 1) for p in CLIENT_PHASES}
    size = {
        p: {"up": up.get(p, 0) / max(counts[p], 1), "down": down.get(p, 0) / max(counts[p], 1)}
        for p in CLIENT_PHASES
    }
    return per_client, server_s, {"bits": params.bits, "per_phase": size}


def run_case(ngf: int, count: int, silent_count: int, repeats: int, signed: bool) -> dict:
    n = masked_weights(ngf)
    degree = count - 1
    threshold = degree // 2 + 1
    rng = np.random.default_rng(0)
    inputs = {1000 + i: rng.integers(0, 2, n, dtype=np.uint8) for i in range(count)}
    silent = set(sorted(inputs)[:silent_count])
    trusts = signed_trusts(inputs) if signed else {}
    best_client, best_server, size = None, None, None
    for _ in range(repeats):
        client_s, server_s, size = one_round(inputs, threshold, degree, silent, trusts)
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
        "signed": signed,
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
    rows = [
        run_case(ngf, k, args.drop_after_share, args.repeats, signed)
        for ngf, k in cases
        for signed in (False, True)
    ]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"# secagg_bench at {git_commit()} on {machine} (load {load:.2f}), best of {args.repeats}, "
        f"{args.drop_after_share} client(s) silent after sharing keys"
    )
    print(
        "| ngf | n | K | b | nodes | client ms adv / share / mask / confirm / unmask | "
        "server ms adv / route / collect / confirm / finish | client s total | "
        "client B up / down besides the vector |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, s, b = r["client_s"], r["server_s"], r["client_bytes"]
        rest_up = b["up"] - r["masked_vector_bytes"]
        print(
            f"| {r['ngf']} | {r['n']:,} | {r['clients']} | {r['bits']} | "
            f"{'signed' if r['signed'] else 'unauthenticated'} | "
            + " / ".join(f"{c[p] * 1e3:.1f}" for p in CLIENT_PHASES)
            + " | "
            + " / ".join(f"{s[p] * 1e3:.1f}" for p in SERVER_PHASES)
            + f" | {sum(c.values()):.3f} | {rest_up:,.0f} / {b['down']:,.0f} |"
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
