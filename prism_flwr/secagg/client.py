"""The client's side of secure aggregation: five phases, each a pure function
(state, message from the server, the node's `Trust`) -> (new state, reply). A message it cannot
trust raises `SecAggError`, and the client leaves the round rather than answer it.

With an identity in its `Trust` (Bell et al. 2020's malicious-server variant) a client signs its
advert, accepts only neighbours' adverts signed by roster members, signs the one survivor set it
is shown (`confirm`) and unmasks only for that set, carrying at least t roster signatures over it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from prism_flwr.secagg.crypto import (
    DOMAIN,
    KEY_BYTES,
    SHARE_BYTES,
    SecAggError,
    commitment,
    derive_key,
    new_keypair,
    node_bytes,
    pack,
    seal,
    split_secret,
    unseal,
)
from prism_flwr.secagg.identity import Identity
from prism_flwr.secagg.round import (
    SEALED_BYTES,
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
    check_floor,
    check_message,
    pair_mask,
    self_mask,
    survivors_message,
)


@dataclass(frozen=True)
class Trust:
    """What a node requires of every round: its identity and roster (None: unauthenticated, the
    model of a server that follows the protocol) and its floor on the clients in any sum."""

    identity: Identity | None = None
    min_clients: int = 0


def share_key(secret: bytes, peer_public: bytes, p: RoundParams, sender: int, receiver: int):
    """The AEAD key for shares sent from `sender` to `receiver` (one key per direction)."""
    label = b"share key" + node_bytes(sender) + node_bytes(receiver)
    return derive_key(secret, peer_public, p.round_id, label)


def share_ad(p: RoundParams, sender: int, receiver: int) -> bytes:
    """Associated data binding a sealed share to its round, sender and receiver."""
    return DOMAIN + b"share" + p.round_id + node_bytes(sender) + node_bytes(receiver)


@dataclass(frozen=True)
class ClientState:
    """A client's secrets between phases (keep it on the client; it never leaves)."""

    params: RoundParams
    node: int
    phase: str
    enc_secret: bytes = b""
    mask_secret: bytes = b""
    seed: bytes = b""
    peers: Mapping[int, KeyAdvert] = field(default_factory=dict)  # neighbours that advertised
    held: Mapping[int, bytes] = field(default_factory=dict)  # owner -> key share || seed share
    confirmed: tuple[int, ...] = ()  # the survivor set this client signed (consistency round)


def _refuse_malformed(step):
    """A message with fields of the wrong kind is refused like any other bad message."""

    @functools.wraps(step)
    def wrapped(*args):
        try:
            return step(*args)
        except (TypeError, AttributeError) as error:
            raise SecAggError(f"malformed message: {type(error).__name__}: {error}") from None

    return wrapped


def _expect(state: ClientState, phase: str) -> RoundParams:
    """The round's parameters, if the client is at `phase` (steps run in order, once each)."""
    if not isinstance(state, ClientState) or state.phase != phase:
        got = state.phase if isinstance(state, ClientState) else type(state).__name__
        raise SecAggError(f"out of order: this step needs a client in phase {phase!r}, got {got!r}")
    return state.params


@_refuse_malformed
def advertise_keys(params: RoundParams, node: int, trust: Trust = Trust()) -> tuple[ClientState, KeyAdvert]:
    """Phase 1: two fresh X25519 key pairs; only the public halves leave the client, signed
    with its long-term key when it has one."""
    if not isinstance(params, RoundParams) or node not in params.clients:
        raise SecAggError(f"node {node!r} is not sampled in this round")
    check_floor(params, trust.min_clients)
    enc_secret, enc_public = new_keypair()
    mask_secret, mask_public = new_keypair()
    state = ClientState(params, node, "advertised", enc_secret, mask_secret)
    advert = KeyAdvert(params.round_id, node, enc_public, mask_public)
    if trust.identity is not None:
        signature = trust.identity.sign(advert_message(params, node, enc_public, mask_public))
        advert = replace(advert, signer=trust.identity.public, signature=signature)
    return state, advert


def _read_adverts(state: ClientState, adverts: Iterable[KeyAdvert], trust: Trust) -> dict[int, KeyAdvert]:
    """The neighbours' adverts as forwarded by the server, each checked (and its signature
    against the roster, one advert per member); at least t of them."""
    p, peers, signers = state.params, {}, set()
    for advert in adverts:
        check_message(advert, KeyAdvert, p, p.graph[state.node])
        if advert.node in peers:
            raise SecAggError(f"advert of node {advert.node} is repeated")
        if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in (advert.enc_key, advert.mask_key)):
            raise SecAggError(f"advert of node {advert.node}: public keys must be 32 bytes")
        if trust.identity is not None:
            message = advert_message(p, advert.node, advert.enc_key, advert.mask_key)
            trust.identity.check(advert.signer, advert.signature, message, f"advert of node {advert.node}")
            if advert.signer in signers or advert.signer == trust.identity.public:
                raise SecAggError(f"advert of node {advert.node} is signed by a member already in the round")
            signers.add(advert.signer)
        peers[advert.node] = advert
    if len(peers) < p.threshold:
        raise SecAggError(f"only {len(peers)} neighbours advertised keys, threshold {p.threshold}")
    return peers


@_refuse_malformed
def share_keys(
    state: ClientState, adverts: Iterable[KeyAdvert], trust: Trust = Trust()
) -> tuple[ClientState, SharePackage]:
    """Phase 2: t-of-k Shamir shares of the masking key s_u and of a fresh self-mask seed b_u,
    each neighbour's pair sealed under a key only that neighbour and this client can derive
    (so a share is as authentic as the advert its key came from)."""
    p = _expect(state, "advertised")
    peers = _read_adverts(state, adverts, trust)
    seed = os.urandom(KEY_BYTES)
    holders = p.graph[state.node]
    key_shares = split_secret(state.mask_secret, p.threshold, len(holders))
    seed_shares = split_secret(seed, p.threshold, len(holders))
    shares = tuple(
        EncryptedShare(
            state.node,
            v,
            seal(
                share_key(state.enc_secret, peers[v].enc_key, p, state.node, v),
                key_shares[i] + seed_shares[i],
                share_ad(p, state.node, v),
            ),
        )
        for i, v in enumerate(holders)
        if v in peers
    )
    package = SharePackage(p.round_id, state.node, commitment(p.round_id, state.node, seed), shares)
    return replace(state, phase="shared", seed=seed, peers=peers), package


def _open_inbox(state: ClientState, inbox: Iterable[EncryptedShare]) -> dict[int, bytes]:
    """Decrypt every share addressed to this client; any bad one refuses the whole inbox, so the
    server's view of whom this client masks with can never diverge from the client's."""
    p, held = state.params, {}
    for share in inbox:
        if not isinstance(share, EncryptedShare) or share.receiver != state.node:
            raise SecAggError("share not addressed to this client")
        if share.sender not in state.peers or share.sender in held:
            raise SecAggError(f"share from node {share.sender!r}: not a neighbour, or repeated")
        if not isinstance(share.blob, bytes) or len(share.blob) != SEALED_BYTES:
            raise SecAggError(f"share from node {share.sender}: wrong size")
        key = share_key(state.enc_secret, state.peers[share.sender].enc_key, p, share.sender, state.node)
        held[share.sender] = unseal(key, share.blob, share_ad(p, share.sender, state.node))
    if len(held) < p.threshold:
        raise SecAggError(f"shares from only {len(held)} neighbours, threshold {p.threshold}")
    return held


def _check_vector(x, length: int) -> np.ndarray:
    """The client's own input as uint16, if it is a 0/1 vector of the round's length."""
    x = np.asarray(x)
    if x.shape != (length,) or not (x.dtype == bool or np.issubdtype(x.dtype, np.integer)):
        raise SecAggError(f"input must be a 0/1 vector of length {length}, got {x.dtype} {x.shape}")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise SecAggError("input must hold only 0 and 1")
    return x.astype(np.uint16)


@_refuse_malformed
def mask_input(state: ClientState, inbox: Iterable[EncryptedShare], x) -> tuple[ClientState, MaskedInput]:
    """Phase 3: y_u = x_u + PRG(b_u) + sum over neighbours v of +-PRG(s_uv) mod 2^bits
    (+ when u < v), packed at `bits` bits per value."""
    p = _expect(state, "shared")
    held = _open_inbox(state, inbox)
    y = _check_vector(x, p.length) + self_mask(state.seed, p, state.node)
    for v in sorted(held):
        mask = pair_mask(state.mask_secret, state.peers[v].mask_key, p, state.node, v)
        y = y + mask if state.node < v else y - mask  # uint16 wraps: exact mod 2^16, so mod 2^b
    y &= np.uint16((1 << p.bits) - 1)
    masked = MaskedInput(p.round_id, state.node, tuple(sorted(held)), pack(y, p.bits))
    return replace(state, phase="masked", held=held), masked


def _survivor_set(state: ClientState, survivors, trust: Trust) -> tuple[int, ...]:
    """The survivor set a server names, if this client can stand behind it: ids of this round
    only (no padding), sorted and unique, itself included, at least t and the node's floor, and
    every surviving neighbour one whose shares it holds (it masked with exactly those)."""
    p = state.params
    survivors = tuple(survivors)
    if not all(isinstance(v, int) and v in p.clients for v in survivors):
        raise SecAggError("survivor set names ids outside this round")
    if list(survivors) != sorted(set(survivors)):
        raise SecAggError("survivor set must be sorted and unique")
    if state.node not in survivors or len(survivors) < max(p.threshold, trust.min_clients):
        raise SecAggError(
            f"survivor set of {len(survivors)} (threshold {p.threshold}, node floor "
            f"{trust.min_clients}) or omits this client"
        )
    strangers = [v for v in survivors if v in p.graph[state.node] and v not in state.held]
    if strangers:
        raise SecAggError(f"survivor set names neighbours {strangers} this client did not mask with")
    return survivors


@_refuse_malformed
def confirm(
    state: ClientState, request: SurvivorSet, trust: Trust = Trust()
) -> tuple[ClientState, Confirmation]:
    """Consistency round: sign the one survivor set this client is shown in this round; it will
    unmask for that set only."""
    p = _expect(state, "masked")
    check_message(request, SurvivorSet, p)
    survivors = _survivor_set(state, request.survivors, trust)
    signer, signature = b"", b""
    if trust.identity is not None:
        signer, signature = trust.identity.public, trust.identity.sign(survivors_message(p, survivors))
    reply = Confirmation(p.round_id, state.node, signer, signature)
    return replace(state, phase="confirmed", confirmed=survivors), reply


def _check_signatures(p: RoundParams, survivors, signatures, trust: Trust) -> None:
    """At least t distinct roster members signed exactly this survivor set in this round."""
    message, signers = survivors_message(p, survivors), set()
    for signer, signature in signatures:
        if signer in signers:
            raise SecAggError("survivor set carries two signatures of one member")
        trust.identity.check(signer, signature, message, "signature over the survivor set")
        signers.add(signer)
    if len(signers) < p.threshold:
        raise SecAggError(f"survivor set signed by {len(signers)} members, threshold {p.threshold}")


@_refuse_malformed
def unmask(
    state: ClientState, request: UnmaskRequest, trust: Trust = Trust()
) -> tuple[ClientState, UnmaskReply]:
    """Phase 4: for each neighbour, the seed share if it survived or the key share if it dropped,
    never both; the secrets are forgotten afterwards, so a second request is refused. With an
    identity: only after `confirm`, for the set it signed, carrying t roster signatures over it."""
    phases = ("confirmed",) if trust.identity is not None else ("masked", "confirmed")
    if not isinstance(state, ClientState) or state.phase not in phases:
        got = state.phase if isinstance(state, ClientState) else type(state).__name__
        raise SecAggError(f"out of order: unmask needs a client in phase {' or '.join(phases)}, got {got!r}")
    p = state.params
    check_message(request, UnmaskRequest, p)
    survivors = _survivor_set(state, request.survivors, trust)
    if state.phase == "confirmed" and survivors != state.confirmed:
        raise SecAggError("unmask request names another survivor set than the one this client signed")
    if trust.identity is not None:
        _check_signatures(p, survivors, request.signatures, trust)
    survivors, dropped = set(survivors), set(request.dropped)
    if not dropped <= set(p.graph[state.node]):
        raise SecAggError("unmask request names dropped ids outside this client's neighbours")
    if survivors & dropped:
        raise SecAggError(f"request asks for both shares of nodes {sorted(survivors & dropped)}")
    seed_shares, key_shares = {}, {}
    for owner, plain in state.held.items():
        if owner in survivors:
            seed_shares[owner] = plain[SHARE_BYTES:]
        elif owner in dropped:
            key_shares[owner] = plain[:SHARE_BYTES]
        else:
            raise SecAggError(f"request does not say whether node {owner} survived")
    done = ClientState(p, state.node, "done")
    return done, UnmaskReply(p.round_id, state.node, seed_shares, key_shares)
