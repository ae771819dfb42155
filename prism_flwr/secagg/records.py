"""The protocol's messages as Flower records, both ways (with ``node.py``, the only modules of
this package that know Flower).

Every message is one ``ConfigRecord`` under ``SECAGG_KEY``: node ids as 8-byte big-endian strings
(Flower node ids are unsigned 64-bit), a list as one field of concatenated fixed-size pieces, a
dict as two such fields. Signatures travel only in an authenticated round (an unauthenticated
round keeps the records it always had). A ``read_*`` raises ``SecAggError`` on any missing,
mistyped or mis-sized field: a refused message, never a crash.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from prism_flwr.secagg.client import ClientState
from prism_flwr.secagg.crypto import KEY_BYTES, SHARE_BYTES, SecAggError
from prism_flwr.secagg.identity import PUBLIC_BYTES, SIGNATURE_BYTES
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
    check_params,
)

SECAGG_KEY = "secagg"  # ConfigRecord of protocol fields, in every secagg message
MASKED_KEY = "secagg-masked"  # the masked vector (flat uint8 Array) in a train reply
STATE_KEY = "secagg-state"  # a client's secrets between phases, in its context.state
ADVERTISE, SHARE = "query.secagg_advertise", "query.secagg_share"
CONFIRM, UNMASK = "query.secagg_confirm", "query.secagg_unmask"


def ids(nodes) -> bytes:
    return b"".join(int(n).to_bytes(8, "big") for n in nodes)


def _chunks(data, size: int, what: str) -> list[bytes]:
    if not isinstance(data, bytes) or len(data) % size:
        raise SecAggError(f"field {what!r} must be bytes in whole {size}-byte pieces")
    return [data[i : i + size] for i in range(0, len(data), size)]


def _read_ids(data, what: str) -> tuple[int, ...]:
    return tuple(int.from_bytes(c, "big") for c in _chunks(data, 8, what))


def get(record, key: str, kind: type, optional: bool = False):
    """A field of the expected Python type, else ``SecAggError``; ``optional``: b"" when absent."""
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"secagg record is a {type(record).__name__}, expected ConfigRecord")
    if key not in record:
        if optional:
            return b""
        raise SecAggError(f"secagg record lacks field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SecAggError(f"secagg field {key!r} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def node_of(record, what: str = "node") -> int:
    nodes = _read_ids(get(record, what, bytes), what)
    if len(nodes) != 1:
        raise SecAggError(f"field {what!r} must name one node")
    return nodes[0]


def _signed(
    record: ConfigRecord, signers: list[bytes], signatures: list[bytes], names=("signers", "signatures")
):
    """Add the signature fields when any is present; an unsigned entry is zeros in a signed list."""
    if any(signers):
        record[names[0]] = b"".join(s or bytes(PUBLIC_BYTES) for s in signers)
        record[names[1]] = b"".join(s or bytes(SIGNATURE_BYTES) for s in signatures)
    return record


def _read_signed(record, count: int, names=("signers", "signatures")) -> list[tuple[bytes, bytes]]:
    signers = _chunks(get(record, names[0], bytes, optional=True), PUBLIC_BYTES, names[0])
    signatures = _chunks(get(record, names[1], bytes, optional=True), SIGNATURE_BYTES, names[1])
    if not signers and not signatures:
        return [(b"", b"")] * count
    if not len(signers) == len(signatures) == count:
        raise SecAggError(f"{names[0]}: one signer and one signature per entry needed")
    return [(b"", b"") if not any(s) else (s, g) for s, g in zip(signers, signatures)]


# ------------------------------------------------------------------------------ server -> client
def params_record(p: RoundParams) -> ConfigRecord:
    fields = {"round-id": p.round_id, "clients": ids(p.clients)}
    return ConfigRecord({**fields, **{k: getattr(p, k) for k in ("threshold", "degree", "bits", "length")}})


def read_params(record) -> RoundParams:
    p = RoundParams(
        get(record, "round-id", bytes),
        _read_ids(get(record, "clients", bytes), "clients"),
        *(get(record, k, int) for k in ("threshold", "degree", "bits", "length")),
    )
    check_params(p)
    return p


def adverts_record(round_id: bytes, adverts) -> ConfigRecord:
    adverts = list(adverts)
    record = ConfigRecord(
        {
            "round-id": round_id,
            "nodes": ids(a.node for a in adverts),
            "enc-keys": b"".join(a.enc_key for a in adverts),
            "mask-keys": b"".join(a.mask_key for a in adverts),
        }
    )
    return _signed(record, [a.signer for a in adverts], [a.signature for a in adverts])


def read_adverts(record) -> list[KeyAdvert]:
    round_id = get(record, "round-id", bytes)
    nodes = _read_ids(get(record, "nodes", bytes), "nodes")
    enc, mask = (_chunks(get(record, k, bytes), KEY_BYTES, k) for k in ("enc-keys", "mask-keys"))
    if not len(nodes) == len(enc) == len(mask):
        raise SecAggError("adverts: as many nodes, encryption keys and masking keys needed")
    signed = _read_signed(record, len(nodes))
    return [KeyAdvert(round_id, u, e, m, *s) for u, e, m, s in zip(nodes, enc, mask, signed)]


def shares_record(shares) -> ConfigRecord:
    return ConfigRecord(
        {
            "senders": ids(s.sender for s in shares),
            "receivers": ids(s.receiver for s in shares),
            "blobs": b"".join(s.blob for s in shares),
        }
    )


def read_shares(record) -> list[EncryptedShare]:
    senders = _read_ids(get(record, "senders", bytes), "senders")
    receivers = _read_ids(get(record, "receivers", bytes), "receivers")
    blobs = _chunks(get(record, "blobs", bytes), SEALED_BYTES, "blobs")
    if not len(senders) == len(receivers) == len(blobs):
        raise SecAggError("shares: as many senders, receivers and sealed shares needed")
    return [EncryptedShare(s, r, b) for s, r, b in zip(senders, receivers, blobs)]


def survivors_record(request: SurvivorSet) -> ConfigRecord:
    return ConfigRecord({"round-id": request.round_id, "survivors": ids(request.survivors)})


def read_survivors(record) -> SurvivorSet:
    return SurvivorSet(
        get(record, "round-id", bytes), _read_ids(get(record, "survivors", bytes), "survivors")
    )


def request_record(request: UnmaskRequest) -> ConfigRecord:
    record = ConfigRecord(
        {"round-id": request.round_id, "survivors": ids(request.survivors), "dropped": ids(request.dropped)}
    )
    return _signed(record, [s for s, _ in request.signatures], [g for _, g in request.signatures])


def read_request(record) -> UnmaskRequest:
    survivors, dropped = (_read_ids(get(record, k, bytes), k) for k in ("survivors", "dropped"))
    signers = _chunks(get(record, "signers", bytes, optional=True), PUBLIC_BYTES, "signers")
    signed = _read_signed(record, len(signers))
    return UnmaskRequest(get(record, "round-id", bytes), survivors, dropped, tuple(signed))


# ------------------------------------------------------------------------------ client -> server
def advert_record(advert: KeyAdvert) -> ConfigRecord:
    record = ConfigRecord(
        {
            "round-id": advert.round_id,
            "node": ids([advert.node]),
            "enc-key": advert.enc_key,
            "mask-key": advert.mask_key,
        }
    )
    if advert.signer:
        record.update({"signer": advert.signer, "signature": advert.signature})
    return record


def read_advert(record) -> KeyAdvert:
    return KeyAdvert(
        get(record, "round-id", bytes),
        node_of(record),
        get(record, "enc-key", bytes),
        get(record, "mask-key", bytes),
        get(record, "signer", bytes, optional=True),
        get(record, "signature", bytes, optional=True),
    )


def package_record(package: SharePackage) -> ConfigRecord:
    record = shares_record(package.shares)
    record.update(
        {"round-id": package.round_id, "node": ids([package.node]), "commitment": package.seed_commitment}
    )
    return record


def read_package(record) -> SharePackage:
    return SharePackage(
        get(record, "round-id", bytes),
        node_of(record),
        get(record, "commitment", bytes),
        tuple(read_shares(record)),
    )


def masked_records(masked: MaskedInput) -> dict:
    """The records of a train reply that replace the mask: the masked vector and its fields."""
    meta = ConfigRecord(
        {"round-id": masked.round_id, "node": ids([masked.node]), "masked-with": ids(masked.masked_with)}
    )
    packed = np.frombuffer(masked.packed, np.uint8).copy()
    return {MASKED_KEY: ArrayRecord({MASKED_KEY: Array(packed)}), SECAGG_KEY: meta}


def read_masked(record, packed: bytes) -> MaskedInput:
    return MaskedInput(
        get(record, "round-id", bytes),
        node_of(record),
        _read_ids(get(record, "masked-with", bytes), "masked-with"),
        packed,
    )


def confirmation_record(c: Confirmation) -> ConfigRecord:
    return ConfigRecord(
        {"round-id": c.round_id, "node": ids([c.node]), "signer": c.signer, "signature": c.signature}
    )


def read_confirmation(record) -> Confirmation:
    return Confirmation(
        get(record, "round-id", bytes),
        node_of(record),
        get(record, "signer", bytes),
        get(record, "signature", bytes),
    )


def unmask_record(reply: UnmaskReply) -> ConfigRecord:
    return ConfigRecord(
        {
            "round-id": reply.round_id,
            "node": ids([reply.node]),
            "seed-owners": ids(reply.seed_shares),
            "seed-shares": b"".join(reply.seed_shares.values()),
            "key-owners": ids(reply.key_shares),
            "key-shares": b"".join(reply.key_shares.values()),
        }
    )


def read_unmask(record) -> UnmaskReply:
    maps = []
    for kind in ("seed", "key"):
        owners = _read_ids(get(record, f"{kind}-owners", bytes), f"{kind}-owners")
        shares = _chunks(get(record, f"{kind}-shares", bytes), SHARE_BYTES, f"{kind}-shares")
        if len(owners) != len(shares) or len(set(owners)) != len(owners):
            raise SecAggError(f"{kind} shares: one share per owner, owners unique")
        maps.append(dict(zip(owners, shares)))
    return UnmaskReply(get(record, "round-id", bytes), node_of(record), *maps)


# ------------------------------------------------------------------------------ the client's own
def state_record(state: ClientState) -> ConfigRecord:
    """The client's secrets as a record of its own ``context.state`` (never sent)."""
    record = params_record(state.params)
    peers = [state.peers[v] for v in sorted(state.peers)]
    record.update(
        {
            "node": ids([state.node]),
            "phase": state.phase,
            "enc-secret": state.enc_secret,
            "mask-secret": state.mask_secret,
            "seed": state.seed,
            "peers": ids(a.node for a in peers),
            "peer-enc": b"".join(a.enc_key for a in peers),
            "peer-mask": b"".join(a.mask_key for a in peers),
            "held-owners": ids(state.held),
            "held": b"".join(state.held.values()),
            "confirmed": ids(state.confirmed),
        }
    )
    return record


def read_state(record) -> ClientState:
    p = read_params(record)
    nodes = _read_ids(get(record, "peers", bytes), "peers")
    enc, mask = (_chunks(get(record, k, bytes), KEY_BYTES, k) for k in ("peer-enc", "peer-mask"))
    owners = _read_ids(get(record, "held-owners", bytes), "held-owners")
    held = _chunks(get(record, "held", bytes), 2 * SHARE_BYTES, "held")
    return ClientState(
        p,
        node_of(record),
        get(record, "phase", str),
        get(record, "enc-secret", bytes),
        get(record, "mask-secret", bytes),
        get(record, "seed", bytes),
        {u: KeyAdvert(p.round_id, u, e, m) for u, e, m in zip(nodes, enc, mask)},
        dict(zip(owners, held)),
        _read_ids(get(record, "confirmed", bytes), "confirmed"),
    )
