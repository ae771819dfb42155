"""Secure aggregation of binary masks (SecAgg+, Bell et al., CCS 2020), without Flower.

Clients: `advertise_keys` -> `share_keys` -> `mask_input` -> [`confirm`] -> `unmask`. Server:
`new_round`, `start_round` -> `collect_adverts` -> `route_shares` -> `collect_masked` ->
`collect_confirmations` (signed adverts) or `skip_confirmation` -> `finish`. The server
learns only the sum mod 2^bits of the surviving clients' 0/1 vectors, i.e. the exact count of
ones per weight. `run_protocol` drives a whole round in one process. Derivation, parameters and
costs: docs/secure-aggregation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import numpy as np

from prism_flwr.secagg.client import (
    ClientState,
    Trust,
    advertise_keys,
    confirm,
    mask_input,
    share_keys,
    unmask,
)
from prism_flwr.secagg.crypto import RoundSkipped, SecAggError, pack, unpack
from prism_flwr.secagg.identity import Identity
from prism_flwr.secagg.round import (
    Aggregate,
    Confirmation,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    RoundParams,
    SharePackage,
    SurvivorSet,
    UnmaskReply,
    UnmaskRequest,
    neighbour_graph,
    new_round,
)
from prism_flwr.secagg.server import (
    ServerState,
    collect_adverts,
    collect_confirmations,
    collect_masked,
    finish,
    route_shares,
    skip_confirmation,
    start_round,
)

__all__ = [
    "SecAggError",
    "RoundSkipped",
    "RoundParams",
    "new_round",
    "neighbour_graph",
    "pack",
    "unpack",
    "KeyAdvert",
    "EncryptedShare",
    "SharePackage",
    "MaskedInput",
    "SurvivorSet",
    "Confirmation",
    "UnmaskRequest",
    "UnmaskReply",
    "Aggregate",
    "ClientState",
    "Identity",
    "Trust",
    "advertise_keys",
    "share_keys",
    "mask_input",
    "confirm",
    "unmask",
    "ServerState",
    "start_round",
    "collect_adverts",
    "route_shares",
    "collect_masked",
    "collect_confirmations",
    "skip_confirmation",
    "finish",
    "PHASES",
    "run_protocol",
]

PHASES = ("start", "advertise", "share", "masked", "confirm")  # where run_protocol lets clients drop out


def _client_step(states: dict, nodes: Iterable[int], step: Callable, refused: list) -> list:
    """Run one client phase on `nodes`; a client that refuses its input leaves the round."""
    replies = []
    for node in nodes:
        try:
            states[node], reply = step(node)
        except SecAggError as error:
            refused.append(("client", node, str(error)))
            continue
        replies.append(reply)
    return replies


def run_protocol(
    inputs: Mapping[int, np.ndarray],
    threshold: int,
    degree: int,
    dropouts: Mapping[str, Iterable[int]] | None = None,
    bits: int | None = None,
    round_id: bytes | None = None,
    trusts: Mapping[int, Trust] | None = None,
) -> Aggregate:
    """Every phase of one round in one process (tests, the in-process runner): `inputs` maps node
    id -> 0/1 vector; `dropouts` maps a phase of PHASES to the nodes that go silent after it;
    `trusts` each node's `Trust` (default: unauthenticated). Raises `RoundSkipped` when too few
    clients remain."""
    drops = {phase: set(nodes) for phase, nodes in (dropouts or {}).items()}
    if not set(drops) <= set(PHASES):
        raise SecAggError(f"dropout phases must be among {PHASES}, got {sorted(drops)}")
    length = len(next(iter(inputs.values()))) if inputs else 0
    params = new_round(inputs, threshold, degree, length, bits, round_id)
    server, states, refused = start_round(params), {}, []
    trust = {u: (trusts or {}).get(u, Trust()) for u in params.clients}

    def alive(nodes, phase):
        return [u for u in nodes if u not in drops.get(phase, ())]

    adverts = _client_step(
        states, alive(params.clients, "start"), lambda u: advertise_keys(params, u, trust[u]), refused
    )
    server, forward = collect_adverts(server, adverts)
    packages = _client_step(
        states, alive(forward, "advertise"), lambda u: share_keys(states[u], forward[u], trust[u]), refused
    )
    server, inbox = route_shares(server, packages)
    masked = _client_step(
        states, alive(inbox, "share"), lambda u: mask_input(states[u], inbox[u], inputs[u]), refused
    )
    server, survivors = collect_masked(server, masked)
    if server.signed:
        confirmations = _client_step(
            states,
            alive(survivors.survivors, "masked"),
            lambda u: confirm(states[u], survivors, trust[u]),
            refused,
        )
        server, requests = collect_confirmations(server, confirmations)
    else:
        server, requests = skip_confirmation(server)
    phase = "confirm" if server.signed else "masked"
    replies = _client_step(
        states, alive(requests, phase), lambda u: unmask(states[u], requests[u], trust[u]), refused
    )
    result = finish(server, replies)
    return replace(result, refused=result.refused + tuple(refused))
