"""The shared vocabulary of secure aggregation: a round's parameters, its masking graph, the
messages of each phase, and the two masks both sides compute.

Messages are frozen dataclasses of ints, bytes and tuples, so a Flower strategy can carry them
in records. The phases are in `client.py` and `server.py`; the derivation in
docs/secure-aggregation.md. What a node signs is built here (`advert_message`,
`survivors_message`), over the digest of the whole round's parameters, so two nodes accept each
other's signatures only when the server gave both the same round.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from prism_flwr.secagg.crypto import (
    DOMAIN,
    NONCE_BYTES,
    SHARE_BYTES,
    TAG_BYTES,
    FloorRefusal,
    SecAggError,
    derive_key,
    hkdf,
    node_bytes,
    prg,
)

SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES  # one neighbour's sealed share pair


@dataclass(frozen=True)
class RoundParams:
    """What every party of one round agrees on; validated on construction (clients get a copy)."""

    round_id: bytes
    clients: tuple[int, ...]  # sorted node ids of the sampled clients
    threshold: int  # t: shares needed to rebuild a secret, and the fewest clients that may go on
    degree: int  # k: neighbours of each client in the masking graph
    bits: int  # masked values live mod 2^bits
    length: int  # n: values per client

    def __post_init__(self):
        check_params(self)

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of every parameter: what signatures bind a message to."""
        fields = (len(self.round_id), self.threshold, self.degree, self.bits, self.length, len(self.clients))
        head = b"".join(int(f).to_bytes(8, "big") for f in fields)
        body = self.round_id + b"".join(node_bytes(c) for c in self.clients)
        return hashlib.sha256(DOMAIN + b"params" + head + body).digest()

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        """Each client's sorted neighbours (computed once per object)."""
        return neighbour_graph(self.round_id, self.clients, self.degree)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_params(p: RoundParams) -> None:
    """Refuse parameters under which the protocol is wrong or unsafe (reasons in the docs)."""
    if not isinstance(p.round_id, bytes) or not 16 <= len(p.round_id) <= 64:
        raise SecAggError("round id must be 16 to 64 bytes")
    if not isinstance(p.clients, tuple) or len(p.clients) < 2:
        raise SecAggError("a round needs a tuple of at least 2 client ids")
    for node in p.clients:
        node_bytes(node)
    if list(p.clients) != sorted(set(p.clients)):
        raise SecAggError("client ids must be unique and sorted")
    count = len(p.clients)
    if not _is_int(p.degree) or not 1 <= p.degree < count or count * p.degree % 2:
        raise SecAggError(f"no {p.degree}-regular graph on {count} clients (need 1 <= k < K, k * K even)")
    if not _is_int(p.threshold) or not p.degree // 2 < p.threshold <= p.degree:
        raise SecAggError(f"threshold {p.threshold} must satisfy k/2 < t <= k (k = {p.degree})")
    if not _is_int(p.bits) or not 1 <= p.bits <= 16 or 1 << p.bits <= count:
        raise SecAggError(f"{p.bits} bits cannot hold a count of up to {count} (need 2^b > K, b <= 16)")
    if not _is_int(p.length) or p.length < 1:
        raise SecAggError(f"vector length {p.length!r} must be a positive integer")


def new_round(
    clients: Iterable[int],
    threshold: int,
    degree: int,
    length: int,
    bits: int | None = None,
    round_id: bytes | None = None,
) -> RoundParams:
    """Phase 0 (server): the round's parameters, with a fresh random round id by default."""
    clients = tuple(sorted(clients))
    bits = len(clients).bit_length() if bits is None else bits  # ceil(log2(K + 1))
    return RoundParams(
        os.urandom(16) if round_id is None else round_id, clients, threshold, degree, bits, length
    )


def neighbour_graph(round_id: bytes, clients: tuple[int, ...], degree: int) -> dict[int, tuple[int, ...]]:
    """A k-regular graph: a circulant (Harary) graph over the clients in an order drawn by hashing
    the round id, so every party computes the same graph and no party chooses it."""
    order = sorted(
        clients, key=lambda c: hashlib.sha256(DOMAIN + b"graph" + round_id + node_bytes(c)).digest()
    )
    count = len(order)
    offsets = [o for h in range(1, degree // 2 + 1) for o in (h, -h)]
    if degree % 2:
        offsets.append(count // 2)
    return {order[i]: tuple(sorted(order[(i + o) % count] for o in offsets)) for i in range(count)}


def check_floor(p: RoundParams, min_clients: int) -> None:
    """A node's floor: every sum its input enters covers at least ``min_clients`` clients, so
    it refuses a round of fewer clients or a threshold below it."""
    if len(p.clients) < min_clients or p.threshold < min_clients:
        raise FloorRefusal(
            f"node refuses the round: {len(p.clients)} clients, threshold {p.threshold}, "
            f"below this node's min-secure-aggregation-clients={min_clients}"
        )


def _ids(nodes: Iterable[int]) -> bytes:
    return b"".join(node_bytes(n) for n in nodes)


def advert_message(p: RoundParams, node: int, enc_key: bytes, mask_key: bytes) -> bytes:
    """What a node signs in its advert: its id and both public keys, in this round."""
    return DOMAIN + b"advert" + p.digest + node_bytes(node) + bytes(enc_key) + bytes(mask_key)


def survivors_message(p: RoundParams, survivors: Iterable[int]) -> bytes:
    """What a node signs in the consistency round: the survivor set it was shown, in this round."""
    return DOMAIN + b"survivors" + p.digest + _ids(sorted(survivors))


@dataclass(frozen=True)
class KeyAdvert:
    """Phase 1, client -> server -> neighbours: the two public keys of one client, signed by its
    long-term key when it has one (``signer`` = b"": an unauthenticated node)."""

    round_id: bytes
    node: int
    enc_key: bytes  # X25519 public key c_u (encrypts shares)
    mask_key: bytes  # X25519 public key s_u (derives pairwise masks)
    signer: bytes = b""  # Ed25519 public key in the roster
    signature: bytes = b""  # over advert_message


@dataclass(frozen=True)
class EncryptedShare:
    """Phase 2, one client's shares for one neighbour: seal(key share || seed share)."""

    sender: int
    receiver: int
    blob: bytes


@dataclass(frozen=True)
class SharePackage:
    """Phase 2, client -> server: a commitment to the self-mask seed and one share per neighbour."""

    round_id: bytes
    node: int
    seed_commitment: bytes
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Phase 3, client -> server: the masked vector packed at `bits` bits per value."""

    round_id: bytes
    node: int
    masked_with: tuple[int, ...]  # neighbours whose pairwise masks were added
    packed: bytes


@dataclass(frozen=True)
class SurvivorSet:
    """Consistency round, server -> survivors: who sent a masked vector."""

    round_id: bytes
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class Confirmation:
    """Consistency round, client -> server: the survivor set it was shown, signed."""

    round_id: bytes
    node: int
    signer: bytes
    signature: bytes  # over survivors_message


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4, server -> one survivor: who survived (with at least t signatures over that set
    when the round is authenticated) and which of its neighbours dropped after sharing."""

    round_id: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[bytes, bytes], ...] = ()  # (signer, signature over survivors_message)


@dataclass(frozen=True)
class UnmaskReply:
    """Phase 4, client -> server: seed shares of surviving neighbours, key shares of dropped ones."""

    round_id: bytes
    node: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class Aggregate:
    """The round's result: per-weight counts of ones over `contributors`, and what was refused."""

    counts: np.ndarray  # uint16, length n
    contributors: tuple[int, ...]
    refused: tuple[tuple[str, object, str], ...] = ()  # (phase, node, reason)


def self_mask(seed: bytes, p: RoundParams, node: int) -> np.ndarray:
    """PRG(b_u): the mask that hides a client's vector even from its own neighbours' help."""
    return prg(hkdf(seed, p.round_id, b"self mask" + node_bytes(node)), p.length, p.bits)


def pair_mask(secret: bytes, peer_public: bytes, p: RoundParams, a: int, b: int) -> np.ndarray:
    """PRG(s_ab): the mask clients a and b add with opposite signs, so it cancels in the sum."""
    label = b"pair mask" + node_bytes(min(a, b)) + node_bytes(max(a, b))
    return prg(derive_key(secret, peer_public, p.round_id, label), p.length, p.bits)


def check_message(message, kind: type, p: RoundParams, senders=None) -> None:
    """Refuse a message of the wrong type, of another round, or from a node not in `senders`."""
    if not isinstance(message, kind):
        raise SecAggError(f"expected a {kind.__name__}, got {type(message).__name__}")
    if message.round_id != p.round_id:
        raise SecAggError(f"{kind.__name__} belongs to another round (replayed or misrouted)")
    if senders is not None and not (_is_int(message.node) and message.node in senders):
        raise SecAggError(f"{kind.__name__} from node {message.node!r}, which may not send one now")
