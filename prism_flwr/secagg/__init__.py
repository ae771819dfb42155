"""Secure aggregation of binary masks (SecAgg+, Bell et al., CCS 2020), without Flower.

Clients: `advertise_keys` -> `share_keys` -> `mask_input` -> `unmask`. Server: `new_round`,
`start_round` -> `collect_adverts` -> `route_shares` -> `collect_masked` -> `finish`. The server
learns only the sum mod 2^bits of the surviving clients' 0/1 vectors, i.e. the exact count of
ones per weight. `run_protocol` drives a whole round in one process. Derivation, parameters and
costs: docs/secure-aggregation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import numpy as np

from prism_flwr.secagg.client import ClientState, advertise_keys, mask_input, share_keys, unmask
from prism_flwr.secagg.crypto import RoundSkipped, SecAggError, pack, unpack
from prism_flwr.secagg.round import (
    Aggregate,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    RoundParams,
    SharePackage,
    UnmaskReply,
    UnmaskRequest,
    neighbour_graph,
    new_round,
)
from prism_flwr.secagg.server import (
    ServerState,
    collect_adverts,
    collect_masked,
    finish,
    route_shares,
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
    "UnmaskRequest",
    "UnmaskReply",
    "Aggregate",
    "ClientState",
    "advertise_keys",
    "share_keys",
    "mask_input",
    "unmask",
    "ServerState",
    "start_round",
    "collect_adverts",
    "route_shares",
    "collect_masked",
    "finish",
    "PHASES",
    "run_protocol",
]

PHASES = ("start", "advertise", "share", "masked")  # where run_protocol lets clients drop out


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
) -> Aggregate:
    """Every phase of one round in one process (tests, the in-process runner): `inputs` maps node
    id -> 0/1 vector; `dropouts` maps a phase of PHASES to the nodes that go silent after it.
    Raises `RoundSkipped` when too few clients remain."""
    drops = {phase: set(nodes) for phase, nodes in (dropouts or {}).items()}
    if not set(drops) <= set(PHASES):
        raise SecAggError(f"dropout phases must be among {PHASES}, got {sorted(drops)}")
    length = len(next(iter(inputs.values()))) if inputs else 0
    params = new_round(inputs, threshold, degree, length, bits, round_id)
    server, states, refused = start_round(params), {}, []

    def alive(nodes, phase):
        return [u for u in nodes if u not in drops.get(phase, ())]

    adverts = _client_step(
        states, alive(params.clients, "start"), lambda u: advertise_keys(params, u), refused
    )
    server, forward = collect_adverts(server, adverts)
    packages = _client_step(
        states, alive(forward, "advertise"), lambda u: share_keys(states[u], forward[u]), refused
    )
    server, inbox = route_shares(server, packages)
    masked = _client_step(
        states, alive(inbox, "share"), lambda u: mask_input(states[u], inbox[u], inputs[u]), refused
    )
    server, request = collect_masked(server, masked)
    replies = _client_step(
        states, alive(request.survivors, "masked"), lambda u: unmask(states[u], request), refused
    )
    result = finish(server, replies)
    return replace(result, refused=result.refused + tuple(refused))
