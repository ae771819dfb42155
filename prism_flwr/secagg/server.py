"""The server's side of secure aggregation: one pure function per phase
(state, the clients' replies) -> (new state, what to send next). Each reply is screened on its
own: a bad one is refused and recorded, and its sender counts as dropped; too few clients left
raises `RoundSkipped`. When the adverts are signed the round has a consistency round
(`collect_confirmations`) between the masked inputs and the unmasking; else `skip_confirmation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import combinations, islice

import numpy as np

from prism_flwr.secagg.crypto import (
    KEY_BYTES,
    SHARE_BYTES,
    RoundSkipped,
    SecAggError,
    combine_secret,
    commitment,
    public_key_of,
    unpack,
)
from prism_flwr.secagg.identity import verify
from prism_flwr.secagg.round import (
    SEALED_BYTES,
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
    advert_message,
    check_message,
    check_params,
    pair_mask,
    self_mask,
    survivors_message,
)

MAX_RECOVERY_ATTEMPTS = 256  # subsets of shares tried when one share is inconsistent


@dataclass(frozen=True)
class ServerState:
    """What the server keeps between phases; nothing in it is secret."""

    params: RoundParams
    adverts: Mapping[int, KeyAdvert] = field(default_factory=dict)  # U1
    commitments: Mapping[int, bytes] = field(default_factory=dict)  # U2
    total: np.ndarray | None = None  # sum of the survivors' masked vectors mod 2^bits
    survivors: tuple[int, ...] = ()  # U3
    helpers: tuple[int, ...] = ()  # asked to unmask: U3, or those of U3 that confirmed it
    refused: tuple[tuple[str, object, str], ...] = ()

    @property
    def signed(self) -> bool:
        """Whether the round is authenticated (its adverts are signed): then it needs a consistency round."""
        return any(a.signer for a in self.adverts.values())


def start_round(params: RoundParams) -> ServerState:
    """Phase 0: the server's empty state for a round (send `params` to every sampled client)."""
    check_params(params)
    return ServerState(params)


def _screen(phase: str, messages: Iterable, check: Callable) -> tuple[dict, list]:
    """Apply `check` to each message; keep (node -> check's result) for the good ones and
    (phase, node, reason) for the refused ones, the first message of a node winning."""
    accepted, refused = {}, []
    for message in messages:
        node = getattr(message, "node", None)
        try:
            value = check(message)
            if node in accepted:
                raise SecAggError(f"duplicate {phase} message from node {node}")
        except (SecAggError, TypeError, AttributeError) as error:  # malformed fields included
            refused.append((phase, node, f"{type(error).__name__}: {error}"))
        else:
            accepted[node] = value
    return accepted, refused


def _require(count: int, p: RoundParams, what: str) -> None:
    if count < p.threshold:
        raise RoundSkipped(f"round skipped: only {count} clients {what} (threshold {p.threshold})")


def collect_adverts(
    state: ServerState, adverts: Iterable[KeyAdvert]
) -> tuple[ServerState, dict[int, tuple[KeyAdvert, ...]]]:
    """Phase 1: keep well-formed adverts, then give each client its neighbours' adverts."""
    p = state.params

    def check(advert):
        check_message(advert, KeyAdvert, p, p.clients)
        if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in (advert.enc_key, advert.mask_key)):
            raise SecAggError("public keys must be 32 bytes")
        if advert.signer or advert.signature:  # who may sign is the clients' roster check
            message = advert_message(p, advert.node, advert.enc_key, advert.mask_key)
            verify(advert.signer, advert.signature, message, f"advert of node {advert.node}")
        return advert

    accepted, refused = _screen("advertise", adverts, check)
    _require(len(accepted), p, "advertised keys")
    forward = {u: tuple(accepted[v] for v in p.graph[u] if v in accepted) for u in accepted}
    return replace(state, adverts=accepted, refused=state.refused + tuple(refused)), forward


def route_shares(
    state: ServerState, packages: Iterable[SharePackage]
) -> tuple[ServerState, dict[int, tuple[EncryptedShare, ...]]]:
    """Phase 2: keep complete share packages and route each sealed share to its receiver."""
    p = state.params

    def check(package):
        check_message(package, SharePackage, p, state.adverts)
        if not isinstance(package.seed_commitment, bytes) or len(package.seed_commitment) != 32:
            raise SecAggError("seed commitment must be 32 bytes")
        expected = [v for v in p.graph[package.node] if v in state.adverts]
        shares = tuple(package.shares) if isinstance(package.shares, (tuple, list)) else ()
        if (
            not all(
                isinstance(s, EncryptedShare)
                and s.sender == package.node
                and isinstance(s.blob, bytes)
                and len(s.blob) == SEALED_BYTES
                for s in shares
            )
            or sorted(s.receiver for s in shares) != expected
        ):
            raise SecAggError(
                f"package of node {package.node} must hold one {SEALED_BYTES}-byte "
                f"share for each neighbour that advertised: {expected}"
            )
        return package

    accepted, refused = _screen("share", packages, check)
    _require(len(accepted), p, "shared keys")
    inbox = {
        u: tuple(s for w in sorted(accepted) for s in accepted[w].shares if s.receiver == u) for u in accepted
    }
    commitments = {u: package.seed_commitment for u, package in accepted.items()}
    return replace(state, commitments=commitments, refused=state.refused + tuple(refused)), inbox


def collect_masked(state: ServerState, inputs: Iterable[MaskedInput]) -> tuple[ServerState, SurvivorSet]:
    """Phase 3: sum the well-formed masked vectors mod 2^bits; the survivor set to confirm."""
    p = state.params

    def check(masked):
        check_message(masked, MaskedInput, p, state.commitments)
        if tuple(masked.masked_with) != tuple(v for v in p.graph[masked.node] if v in state.commitments):
            raise SecAggError(f"node {masked.node} masked with the wrong set of neighbours")
        return unpack(masked.packed, p.length, p.bits)

    accepted, refused = _screen("masked", inputs, check)
    _require(len(accepted), p, "sent masked vectors")
    total = np.zeros(p.length, np.uint16)
    for vector in accepted.values():
        total += vector  # wraps mod 2^16; reduced mod 2^bits in `finish`
    survivors = tuple(sorted(accepted))
    new = replace(state, total=total, survivors=survivors, refused=state.refused + tuple(refused))
    return new, SurvivorSet(p.round_id, survivors)


def _requests(state: ServerState, helpers, signatures) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """One unmask request per helper: the survivors, its own dropped neighbours, the signatures."""
    p = state.params
    dropped = [u for u in sorted(state.commitments) if u not in state.survivors]
    requests = {
        u: UnmaskRequest(
            p.round_id, state.survivors, tuple(v for v in dropped if v in p.graph[u]), signatures
        )
        for u in helpers
    }
    return replace(state, helpers=tuple(sorted(helpers))), requests


def collect_confirmations(
    state: ServerState, confirmations: Iterable[Confirmation]
) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """Consistency round: keep the survivors' signatures over the survivor set (each checked
    against its signer's advert key); at least t are needed before anyone is asked to unmask."""
    p = state.params
    message = survivors_message(p, state.survivors)

    def check(c):
        check_message(c, Confirmation, p, state.survivors)
        advert = state.adverts[c.node]
        if advert.signer:
            if c.signer != advert.signer:
                raise SecAggError("confirmation signed by another key than the node's advert")
            verify(c.signer, c.signature, message, f"confirmation of node {c.node}")
        return c

    accepted, refused = _screen("confirm", confirmations, check)
    _require(len(accepted), p, "confirmed the survivor set")
    signatures = tuple((c.signer, c.signature) for _, c in sorted(accepted.items()) if c.signer)
    state = replace(state, refused=state.refused + tuple(refused))
    return _requests(state, accepted, signatures)


def skip_confirmation(state: ServerState) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """An unauthenticated round (no advert signed): every survivor is asked to unmask at once."""
    if state.signed:
        raise SecAggError("an authenticated round needs its consistency round")
    return _requests(state, state.survivors, ())


def _recover(p: RoundParams, owner: int, shares: dict[int, bytes], valid: Callable, what: str):
    """Rebuild a secret of `owner` from its holders' shares: the first t-subset whose result
    passes `valid` (so one inconsistent share cannot silently corrupt the sum)."""
    if len(shares) < p.threshold:
        raise RoundSkipped(
            f"round skipped: only {len(shares)} shares of the {what} of node "
            f"{owner} (threshold {p.threshold})"
        )
    index = {v: i + 1 for i, v in enumerate(p.graph[owner])}
    for subset in islice(combinations(sorted(shares), p.threshold), MAX_RECOVERY_ATTEMPTS):
        secret = combine_secret({index[v]: shares[v] for v in subset})
        if valid(secret):
            return secret
    raise RoundSkipped(f"round skipped: the shares of the {what} of node {owner} are inconsistent")


def finish(state: ServerState, replies: Iterable[UnmaskReply]) -> Aggregate:
    """Phase 4: remove the survivors' self masks and the masks shared with dropped clients; what
    remains is the exact count of ones per weight over the survivors."""
    p, survivors = state.params, set(state.survivors)
    dropped = [u for u in sorted(state.commitments) if u not in survivors]

    def check(reply):
        check_message(reply, UnmaskReply, p, state.helpers)
        held = [v for v in p.graph[reply.node] if v in state.commitments]
        for name, shares, wanted in (
            ("seed", reply.seed_shares, survivors),
            ("key", reply.key_shares, set(dropped)),
        ):
            if (
                not isinstance(shares, Mapping)
                or sorted(shares) != [v for v in held if v in wanted]
                or not all(isinstance(s, bytes) and len(s) == SHARE_BYTES for s in shares.values())
            ):
                raise SecAggError(f"reply of node {reply.node}: wrong set or size of {name} shares")
        return reply

    accepted, refused = _screen("unmask", replies, check)
    _require(len(accepted), p, "helped unmask")
    total = state.total.copy()
    for u in state.survivors:
        shares = {v: r.seed_shares[u] for v, r in accepted.items() if u in r.seed_shares}
        seed = _recover(
            p,
            u,
            shares,
            lambda s, u=u: commitment(p.round_id, u, s) == state.commitments[u],
            "self-mask seed",
        )
        total -= self_mask(seed, p, u)
    for u in dropped:
        shares = {v: r.key_shares[u] for v, r in accepted.items() if u in r.key_shares}
        secret = _recover(
            p, u, shares, lambda s, u=u: public_key_of(s) == state.adverts[u].mask_key, "masking key"
        )
        for v in (v for v in p.graph[u] if v in survivors):  # v added +PRG(s_uv) iff v < u
            mask = pair_mask(secret, state.adverts[v].mask_key, p, u, v)
            total = total - mask if v < u else total + mask
    total &= np.uint16((1 << p.bits) - 1)
    return Aggregate(total, state.survivors, state.refused + tuple(refused))
