"""Secure aggregation (SecAgg+) of the masks over Flower's Message API.

One training round with ``secure-aggregation = "secagg+"``:

1. ``configure_train``: the strategy samples K nodes as usual, then runs the two setup phases as
   ``query.secagg_advertise`` (round parameters -> two public keys) and ``query.secagg_share``
   (neighbours' keys -> sealed shares) through ``grid.send_and_receive``; the train messages go to
   the nodes that shared, each carrying the shares routed to it;
2. the ClientApp trains as always, reads its own mask as a 0/1 vector and replies the masked
   vector at b = ceil(log2(K + 1)) bits per weight instead of the mask;
3. ``aggregate_train``: replies are validated as any reply (plus: the node field must be the
   sender, the round id this round's), then ``query.secagg_unmask`` to the survivors; the counts
   of ones go through MADA's rule unchanged (``MADA.step_counts``).

A node that errs, is silent or sends a bad message at any phase is a dropout; when too few remain
the round is skipped with the reason in its ``history.json`` record and the global scores stay.
The protocol messages map onto ``ConfigRecord`` fields here (node ids as 8-byte big-endian
strings: Flower node ids are unsigned 64-bit); the client's secrets stay in its ``context.state``.
"""

from __future__ import annotations

import os
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log

from prism_flwr.federated.aggregation import AggregationError
from prism_flwr.federated.secure_sum import secagg_parameters
from prism_flwr.secagg import (
    ClientState,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    RoundParams,
    RoundSkipped,
    SecAggError,
    SharePackage,
    UnmaskReply,
    UnmaskRequest,
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
from prism_flwr.secagg.crypto import SHARE_BYTES, packed_size
from prism_flwr.secagg.round import SEALED_BYTES, check_message, check_params

from .base import _wire_bytes
from .mada import MADA
from .replies import ReplyRejected
from .replies import clip as _clip
from .replies import node_of as _node
from .replies import reason as _reason

SECAGG_KEY = "secagg"  # ConfigRecord of protocol fields, in every secagg message
MASKED_KEY = "secagg-masked"  # the masked vector (flat uint8 Array) in a train reply
STATE_KEY = "secagg-state"  # a client's secrets between phases, in its context.state
ADVERTISE, SHARE, UNMASK = "query.secagg_advertise", "query.secagg_share", "query.secagg_unmask"
KEY_BYTES = 32


# ---------------------------------------------------------------------------- record mapping
def _ids(nodes) -> bytes:
    return b"".join(int(n).to_bytes(8, "big") for n in nodes)


def _chunks(data, size: int, what: str) -> list[bytes]:
    if not isinstance(data, bytes) or len(data) % size:
        raise SecAggError(f"field {what!r} must be bytes in whole {size}-byte pieces")
    return [data[i : i + size] for i in range(0, len(data), size)]


def _read_ids(data, what: str) -> tuple[int, ...]:
    return tuple(int.from_bytes(c, "big") for c in _chunks(data, 8, what))


def _get(record, key: str, kind: type):
    """A field of the expected Python type, else ``SecAggError`` (a refused message, not a crash)."""
    if not isinstance(record, ConfigRecord) or key not in record:
        raise SecAggError(f"secagg record lacks field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SecAggError(f"secagg field {key!r} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _node_of(record, what: str = "node") -> int:
    nodes = _read_ids(_get(record, what, bytes), what)
    if len(nodes) != 1:
        raise SecAggError(f"field {what!r} must name one node")
    return nodes[0]


def params_record(p: RoundParams) -> ConfigRecord:
    return ConfigRecord(
        {
            "round-id": p.round_id,
            "clients": _ids(p.clients),
            "threshold": p.threshold,
            "degree": p.degree,
            "bits": p.bits,
            "length": p.length,
        }
    )


def read_params(record) -> RoundParams:
    p = RoundParams(
        _get(record, "round-id", bytes),
        _read_ids(_get(record, "clients", bytes), "clients"),
        *(_get(record, k, int) for k in ("threshold", "degree", "bits", "length")),
    )
    check_params(p)
    return p


def adverts_record(round_id: bytes, adverts) -> ConfigRecord:
    return ConfigRecord(
        {
            "round-id": round_id,
            "nodes": _ids(a.node for a in adverts),
            "enc-keys": b"".join(a.enc_key for a in adverts),
            "mask-keys": b"".join(a.mask_key for a in adverts),
        }
    )


def read_adverts(record) -> list[KeyAdvert]:
    round_id = _get(record, "round-id", bytes)
    nodes = _read_ids(_get(record, "nodes", bytes), "nodes")
    enc, mask = (_chunks(_get(record, k, bytes), KEY_BYTES, k) for k in ("enc-keys", "mask-keys"))
    if not len(nodes) == len(enc) == len(mask):
        raise SecAggError("adverts: as many nodes, encryption keys and masking keys needed")
    return [KeyAdvert(round_id, u, e, m) for u, e, m in zip(nodes, enc, mask)]


def shares_record(shares) -> ConfigRecord:
    return ConfigRecord(
        {
            "senders": _ids(s.sender for s in shares),
            "receivers": _ids(s.receiver for s in shares),
            "blobs": b"".join(s.blob for s in shares),
        }
    )


def read_shares(record) -> list[EncryptedShare]:
    senders = _read_ids(_get(record, "senders", bytes), "senders")
    receivers = _read_ids(_get(record, "receivers", bytes), "receivers")
    blobs = _chunks(_get(record, "blobs", bytes), SEALED_BYTES, "blobs")
    if not len(senders) == len(receivers) == len(blobs):
        raise SecAggError("shares: as many senders, receivers and sealed shares needed")
    return [EncryptedShare(s, r, b) for s, r, b in zip(senders, receivers, blobs)]


def package_record(package: SharePackage) -> ConfigRecord:
    record = shares_record(package.shares)
    record.update(
        {"round-id": package.round_id, "node": _ids([package.node]), "commitment": package.seed_commitment}
    )
    return record


def read_package(record) -> SharePackage:
    return SharePackage(
        _get(record, "round-id", bytes),
        _node_of(record),
        _get(record, "commitment", bytes),
        tuple(read_shares(record)),
    )


def request_record(request: UnmaskRequest) -> ConfigRecord:
    return ConfigRecord(
        {"round-id": request.round_id, "survivors": _ids(request.survivors), "dropped": _ids(request.dropped)}
    )


def read_request(record) -> UnmaskRequest:
    survivors, dropped = (_read_ids(_get(record, k, bytes), k) for k in ("survivors", "dropped"))
    return UnmaskRequest(_get(record, "round-id", bytes), survivors, dropped)


def unmask_record(reply: UnmaskReply) -> ConfigRecord:
    return ConfigRecord(
        {
            "round-id": reply.round_id,
            "node": _ids([reply.node]),
            "seed-owners": _ids(reply.seed_shares),
            "seed-shares": b"".join(reply.seed_shares.values()),
            "key-owners": _ids(reply.key_shares),
            "key-shares": b"".join(reply.key_shares.values()),
        }
    )


def read_unmask(record) -> UnmaskReply:
    maps = []
    for kind in ("seed", "key"):
        owners = _read_ids(_get(record, f"{kind}-owners", bytes), f"{kind}-owners")
        shares = _chunks(_get(record, f"{kind}-shares", bytes), SHARE_BYTES, f"{kind}-shares")
        if len(owners) != len(shares) or len(set(owners)) != len(owners):
            raise SecAggError(f"{kind} shares: one share per owner, owners unique")
        maps.append(dict(zip(owners, shares)))
    return UnmaskReply(_get(record, "round-id", bytes), _node_of(record), *maps)


def state_record(state: ClientState) -> ConfigRecord:
    """The client's secrets as a record of its own ``context.state`` (never sent)."""
    record = params_record(state.params)
    peers = [state.peers[v] for v in sorted(state.peers)]
    record.update(
        {
            "node": _ids([state.node]),
            "phase": state.phase,
            "enc-secret": state.enc_secret,
            "mask-secret": state.mask_secret,
            "seed": state.seed,
            "peers": adverts_record(state.params.round_id, peers)["nodes"],
            "peer-enc": b"".join(a.enc_key for a in peers),
            "peer-mask": b"".join(a.mask_key for a in peers),
            "held-owners": _ids(state.held),
            "held": b"".join(state.held.values()),
        }
    )
    return record


def read_state(record) -> ClientState:
    p = read_params(record)
    peers = read_adverts(
        ConfigRecord(
            {
                "round-id": p.round_id,
                "nodes": _get(record, "peers", bytes),
                "enc-keys": _get(record, "peer-enc", bytes),
                "mask-keys": _get(record, "peer-mask", bytes),
            }
        )
    )
    owners = _read_ids(_get(record, "held-owners", bytes), "held-owners")
    held = _chunks(_get(record, "held", bytes), 2 * SHARE_BYTES, "held")
    return ClientState(
        p,
        _node_of(record),
        _get(record, "phase", str),
        _get(record, "enc-secret", bytes),
        _get(record, "mask-secret", bytes),
        _get(record, "seed", bytes),
        {a.node: a for a in peers},
        dict(zip(owners, held)),
    )


# ---------------------------------------------------------------------------- client steps
def _content(content, key: str = SECAGG_KEY):
    if not isinstance(content, RecordDict) or key not in content:
        raise SecAggError(f"message lacks the {key!r} record")
    return content[key]


def client_advertise(content: RecordDict, node: int) -> tuple[ConfigRecord, RecordDict]:
    """``query.secagg_advertise``: fresh keys for the round; (state to keep, reply content)."""
    state, advert = advertise_keys(read_params(_content(content)), node)
    reply = ConfigRecord(
        {
            "round-id": advert.round_id,
            "node": _ids([node]),
            "enc-key": advert.enc_key,
            "mask-key": advert.mask_key,
        }
    )
    return state_record(state), RecordDict({SECAGG_KEY: reply})


def client_share(content: RecordDict, kept) -> tuple[ConfigRecord, RecordDict]:
    """``query.secagg_share``: the neighbours' keys in, sealed shares out."""
    state, package = share_keys(read_state(kept), read_adverts(_content(content)))
    return state_record(state), RecordDict({SECAGG_KEY: package_record(package)})


def client_mask(content: RecordDict, kept, x: np.ndarray) -> tuple[ConfigRecord, dict]:
    """The train step's end: the shares routed to this client in, the masked vector's records out
    (to put into the train reply in place of the mask)."""
    state, masked = mask_input(read_state(kept), read_shares(_content(content)), x)
    meta = ConfigRecord(
        {"round-id": masked.round_id, "node": _ids([masked.node]), "masked-with": _ids(masked.masked_with)}
    )
    packed = np.frombuffer(masked.packed, np.uint8).copy()
    return state_record(state), {MASKED_KEY: ArrayRecord({MASKED_KEY: Array(packed)}), SECAGG_KEY: meta}


def client_unmask(content: RecordDict, kept) -> RecordDict:
    """``query.secagg_unmask``: one kind of share per neighbour; the state is spent afterwards."""
    _, reply = unmask(read_state(kept), read_request(_content(content)))
    return RecordDict({SECAGG_KEY: unmask_record(reply)})


# ---------------------------------------------------------------------------- server side
def _read_advert(record) -> KeyAdvert:
    return KeyAdvert(
        _get(record, "round-id", bytes),
        _node_of(record),
        _get(record, "enc-key", bytes),
        _get(record, "mask-key", bytes),
    )


def _read_masked(record, packed: bytes) -> MaskedInput:
    return MaskedInput(
        _get(record, "round-id", bytes),
        _node_of(record),
        _read_ids(_get(record, "masked-with", bytes), "masked-with"),
        packed,
    )


def _new_notes() -> dict:
    """What a round records about the protocol: dropouts, refusals, its messages' wire bytes."""
    return {"down": 0, "up": 0, "dropped": [], "refused": []}


class SecAggMADA(MADA):
    """MADA on the counts a SecAgg+ round gives; the server never sees a single mask."""

    upload_key = MASKED_KEY
    extra_records = (SECAGG_KEY,)

    def __init__(self, *, phase_timeout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phase_timeout = phase_timeout  # each setup / unmask exchange

        self._grid = None
        self._sampled = 0  # clients sampled this round
        self._server = None  # secagg ServerState of the round in progress
        self._notes = _new_notes()

    @classmethod
    def from_config(cls, cfg, **kwargs):
        return super().from_config(cfg, phase_timeout=cfg.round_timeout, **kwargs)

    @property
    def max_upload_bytes(self) -> int:
        return packed_size(self.num_weights, 16)  # the exact size is checked by the protocol

    def decode(self, array: Array) -> bytes:
        if array.dtype != "uint8" or len(array.shape) != 1:
            raise ValueError(f"masked vector must be a flat uint8 array, got {array.dtype} {array.shape}")
        return array.numpy().tobytes()

    # -------------------------------------------------------------------------- exchanges
    def _exchange(self, kind: str, contents: dict[int, RecordDict], phase: str, read) -> list:
        """Send one message per node, wait for the replies and read each: a node that errs, is
        silent, or replies with a bad record or with another node's id is a dropout of ``phase``."""
        notes = self._notes
        messages = [Message(content=c, dst_node_id=u, message_type=kind) for u, c in contents.items()]
        notes["down"] += _wire_bytes(messages) or 0
        replies = list(self._grid.send_and_receive(messages, timeout=self.phase_timeout)) if messages else []
        out, seen = [], set()
        for msg in replies:
            node = _node(msg)
            try:
                if msg.has_error():
                    raise ReplyRejected(_clip(str(msg.error.reason)))
                notes["up"] += _wire_bytes([msg]) or 0
                if node not in contents or node in seen:
                    raise ReplyRejected("reply from a node not asked, or a second reply")
                if set(msg.content.keys()) != {SECAGG_KEY}:
                    raise ReplyRejected(f"a {phase} reply holds exactly the record {SECAGG_KEY!r}")
                message = read(msg.content[SECAGG_KEY])
                if message.node != node:
                    raise ReplyRejected(f"node field {message.node} is not the sender {node}")
            except Exception as err:  # noqa: BLE001 - one bad reply is one dropout
                notes["dropped"].append(f"{phase}: node {node}: {_reason(err)}")
                continue
            seen.add(node)
            out.append(message)
        silent = sorted(set(contents) - seen - {_node(m) for m in replies})
        notes["dropped"] += [f"{phase}: node {u}: no reply" for u in silent]
        return out

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        self._grid, self._server = grid, None
        self._notes = _new_notes()
        rnd = server_round + self.round_offset
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        self._sampled = len(nodes)  # asked to take part, whether or not they got as far as training
        try:
            if len(nodes) < 2:
                raise RoundSkipped(f"round skipped: {len(nodes)} clients sampled, secure aggregation needs 2")
            threshold, degree = secagg_parameters(len(nodes))
            params = new_round(
                nodes, threshold, degree, self.num_weights, round_id=rnd.to_bytes(8, "big") + os.urandom(16)
            )
            server = start_round(params)
            ask = {u: RecordDict({SECAGG_KEY: params_record(params)}) for u in nodes}
            adverts = self._exchange(ADVERTISE, ask, "advertise", _read_advert)
            server, forward = collect_adverts(server, adverts)
            ask = {u: RecordDict({SECAGG_KEY: adverts_record(params.round_id, forward[u])}) for u in forward}
            server, inbox = route_shares(server, self._exchange(SHARE, ask, "share", read_package))
        except SecAggError as err:
            self._notes["skip"] = str(err)
            self._asked_nodes, self._sent = set(), []
            log(WARNING, "round %d: secure aggregation setup failed: %s", rnd, err)
            return []
        self._server = server
        log(
            INFO,
            "round %d: secure aggregation set up: %d of %d clients shared keys (t = %d, k = %d, b = %d)",
            rnd,
            len(inbox),
            len(nodes),
            threshold,
            degree,
            params.bits,
        )
        messages = [
            Message(
                content=RecordDict({**dict(m.content.items()), SECAGG_KEY: shares_record(inbox[u])}),
                dst_node_id=u,
                message_type=m.metadata.message_type,
            )
            for m in messages
            if (u := m.metadata.dst_node_id) in inbox
        ]
        self._asked_nodes = set(inbox)
        self._sent = [int(m.content[self.payload_key][self.payload_key].numpy().nbytes) for m in messages]
        self._down_wire = _wire_bytes(messages)
        return messages

    def _check_train(self, msg: Message):
        packed, metrics, nbytes = super()._check_train(msg)
        masked = _read_masked(msg.content[SECAGG_KEY], packed)
        if masked.node != msg.metadata.src_node_id:
            raise ReplyRejected(f"node field {masked.node} is not the sender {msg.metadata.src_node_id}")
        check_message(masked, MaskedInput, self._server.params, self._server.commitments)  # replay, round
        return masked, metrics, nbytes

    def combine(self, rnd: int, payloads: list, weights: np.ndarray) -> tuple[np.ndarray, dict]:
        try:
            return self._combine(rnd, payloads)
        except SecAggError as err:  # too few survivors, shares or contributors: the round is skipped
            raise AggregationError(str(err)) from None

    def _combine(self, rnd: int, payloads: list) -> tuple[np.ndarray, dict]:
        server, request = collect_masked(self._server, payloads)
        ask = {u: RecordDict({SECAGG_KEY: request_record(request)}) for u in request.survivors}
        result = finish(server, self._exchange(UNMASK, ask, "unmask", read_unmask))
        self._notes["refused"] = [f"{phase}: node {node}: {why}" for phase, node, why in result.refused]
        k = len(result.contributors)
        log(
            INFO,
            "round %d: secure aggregate of %d masked vectors (%d asked to unmask)",
            rnd,
            k,
            len(request.survivors),
        )
        if k < self.min_train_nodes:
            raise RoundSkipped(f"round skipped: {k} contributors, min-train-nodes is {self.min_train_nodes}")
        new, extra = self.step_counts(rnd, result.counts, k)
        return new, {**extra, "secagg_contributors": k}

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        record = self.round_records[server_round + self.round_offset]
        notes = self._notes
        record["secagg"] = {
            "dropped": notes["dropped"],
            "refused": notes["refused"],
            "bits": self._server.params.bits if self._server else None,
            "uplink_wire_bytes": notes["up"],
            "downlink_wire_bytes": notes["down"],
        }
        if "skip" in notes:  # the setup failed: no training message went out
            record["skip_reason"] = notes["skip"]
        # every message of the round, both ways, in the wire counts
        record["uplink_wire_bytes"] = record.get("uplink_wire_bytes", 0) + notes["up"]
        record["downlink_wire_bytes"] = (record.get("downlink_wire_bytes") or 0) + notes["down"]
        record["asked"] = self._sampled
        if asked := self._sampled:
            per_client = {
                "up": record["uplink_wire_bytes"] / asked,
                "down": record["downlink_wire_bytes"] / asked,
            }
            record["wire_bytes_per_client"] = per_client
            record["wire_bits_per_weight_up"] = 8 * per_client["up"] / self.num_weights
            record["wire_bits_per_weight_down"] = 8 * per_client["down"] / self.num_weights
        self._server = self._grid = None  # nothing of this round is kept
        return out
