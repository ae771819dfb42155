"""Secure aggregation (SecAgg+) of the masks over Flower's Message API: MADA on the counts.

One training round with ``secure-aggregation = "secagg+"``, as the base's phases
(``strategies/phases.py``), each an explicit exchange with the nodes:

1. ``setup_train``: ``query.secagg_advertise`` (round parameters -> public keys, signed by nodes
   with a roster) and ``query.secagg_share`` (neighbours' keys -> sealed shares); the nodes that
   shared train, each message carrying the shares routed to it;
2. the ClientApp trains as always and replies its mask masked, at b = ceil(log2(K + 1)) bits per
   weight, instead of the mask (``read_reply`` checks its node field and round);
3. ``finish_train``: the consistency round ``query.secagg_confirm`` (when the adverts are signed:
   the survivors sign the survivor set) and ``query.secagg_unmask``; the counts of ones go
   through MADA's rule unchanged (``combine`` -> ``MADA.step_counts``).

A node that errs, is silent or sends a bad message at any phase is a dropout; when too few remain
the round is skipped with the reason in its ``history.json`` record and the global scores stay.
The records are ``prism_flwr/secagg/records.py``'s; the node's steps ``prism_flwr/secagg/node.py``.
"""

from __future__ import annotations

import os
from logging import INFO

import numpy as np
from flwr.app import Array, Message, RecordDict
from flwr.common import log

from prism_flwr.federated.aggregation import AggregationError
from prism_flwr.federated.secure_sum import secagg_parameters
from prism_flwr.secagg import (
    Aggregate,
    MaskedInput,
    RoundSkipped,
    SecAggError,
    collect_adverts,
    collect_confirmations,
    collect_masked,
    finish,
    new_round,
    route_shares,
    skip_confirmation,
    start_round,
)
from prism_flwr.secagg.crypto import packed_size
from prism_flwr.secagg.records import (
    ADVERTISE,
    CONFIRM,
    MASKED_KEY,
    SECAGG_KEY,
    SHARE,
    UNMASK,
    adverts_record,
    params_record,
    read_advert,
    read_confirmation,
    read_masked,
    read_package,
    read_unmask,
    request_record,
    shares_record,
    survivors_record,
)
from prism_flwr.secagg.round import check_message

from .mada import MADA
from .replies import ReplyRejected, clip, node_of, reason


class SecAggMADA(MADA):
    """MADA on the counts a SecAgg+ round gives; the server never sees a single mask."""

    upload_key = MASKED_KEY
    extra_records = (SECAGG_KEY,)

    def __init__(self, *, phase_timeout: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phase_timeout = phase_timeout  # each setup / confirm / unmask exchange
        self._server = None  # secagg ServerState of the round in progress
        self._notes = {"dropped": [], "refused": []}  # the round's dropouts and refused messages

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

    def _ask(self, kind: str, contents: dict[int, RecordDict], phase: str, read) -> list:
        """One exchange: a message per node, each reply read; a node that errs, is silent, or
        replies with a bad record or with another node's id is a dropout of ``phase``."""
        messages = [Message(content=c, dst_node_id=u, message_type=kind) for u, c in contents.items()]
        replies = self.exchange(messages, self.phase_timeout)
        out, seen, dropped = [], set(), self._notes["dropped"]
        for msg in replies:
            node = node_of(msg)
            try:
                if msg.has_error():
                    raise ReplyRejected(clip(str(msg.error.reason)))
                if node not in contents or node in seen:
                    raise ReplyRejected("reply from a node not asked, or a second reply")
                if set(msg.content.keys()) != {SECAGG_KEY}:
                    raise ReplyRejected(f"a {phase} reply holds exactly the record {SECAGG_KEY!r}")
                message = read(msg.content[SECAGG_KEY])
                if message.node != node:
                    raise ReplyRejected(f"node field {message.node} is not the sender {node}")
            except Exception as err:  # noqa: BLE001 - one bad reply is one dropout
                dropped.append(f"{phase}: node {node}: {reason(err)}")
                continue
            seen.add(node)
            out.append(message)
        silent = sorted(set(contents) - seen - {node_of(m) for m in replies})
        dropped += [f"{phase}: node {u}: no reply" for u in silent]
        return out

    # ------------------------------------------------------------------------------ phases
    def setup_train(self, rnd: int, nodes: list[int]) -> dict[int, dict]:
        """Keys and shares: the nodes that shared train, each message carrying its shares."""
        self._server, self._notes = None, {"dropped": [], "refused": []}
        try:
            if len(nodes) < 2:
                raise RoundSkipped(f"round skipped: {len(nodes)} clients sampled, secure aggregation needs 2")
            threshold, degree = secagg_parameters(len(nodes))
            round_id = rnd.to_bytes(8, "big") + os.urandom(16)
            params = new_round(nodes, threshold, degree, self.num_weights, round_id=round_id)
            server = start_round(params)
            ask = {u: RecordDict({SECAGG_KEY: params_record(params)}) for u in nodes}
            server, forward = collect_adverts(server, self._ask(ADVERTISE, ask, "advertise", read_advert))
            ask = {u: RecordDict({SECAGG_KEY: adverts_record(params.round_id, forward[u])}) for u in forward}
            server, inbox = route_shares(server, self._ask(SHARE, ask, "share", read_package))
        except SecAggError as err:
            raise AggregationError(str(err)) from None
        self._server = server
        log(
            INFO,
            "round %d: secure aggregation set up: %d of %d clients shared keys (t = %d, k = %d, b = %d%s)",
            rnd,
            len(inbox),
            len(nodes),
            threshold,
            degree,
            params.bits,
            ", signed" if server.signed else "",
        )
        return {u: {SECAGG_KEY: shares_record(inbox[u])} for u in inbox}

    def read_reply(self, msg: Message, array: Array) -> MaskedInput:
        masked = read_masked(msg.content[SECAGG_KEY], self.decode(array))
        if masked.node != msg.metadata.src_node_id:
            raise ReplyRejected(f"node field {masked.node} is not the sender {msg.metadata.src_node_id}")
        check_message(masked, MaskedInput, self._server.params, self._server.commitments)  # replay, round
        return masked

    def finish_train(self, rnd: int, payloads: list) -> Aggregate:
        """Sum, consistency round (signed rounds), unmasking: the counts over the contributors."""
        try:
            server, survivors = collect_masked(self._server, payloads)
            if server.signed:
                ask = {u: RecordDict({SECAGG_KEY: survivors_record(survivors)}) for u in survivors.survivors}
                server, requests = collect_confirmations(
                    server, self._ask(CONFIRM, ask, "confirm", read_confirmation)
                )
            else:
                server, requests = skip_confirmation(server)
            ask = {u: RecordDict({SECAGG_KEY: request_record(r)}) for u, r in requests.items()}
            result = finish(server, self._ask(UNMASK, ask, "unmask", read_unmask))
        except SecAggError as err:  # too few survivors, signatures or shares: the round is skipped
            raise AggregationError(str(err)) from None
        self._notes["refused"] = [f"{phase}: node {node}: {why}" for phase, node, why in result.refused]
        k = len(result.contributors)
        log(
            INFO,
            "round %d: secure aggregate of %d masked vectors (%d asked to unmask)",
            rnd,
            k,
            len(requests),
        )
        if k < self.min_train_nodes:
            raise AggregationError(
                f"round skipped: {k} contributors, min-train-nodes is {self.min_train_nodes}"
            )
        return result

    def combine(self, rnd: int, result: Aggregate, weights: np.ndarray) -> tuple[np.ndarray, dict]:
        k = len(result.contributors)
        new, extra = self.step_counts(rnd, result.counts, k)
        return new, {**extra, "secagg_contributors": k}

    def round_notes(self) -> dict:
        down, up = self.side_wire_bytes
        return {
            "secagg": {
                **self._notes,
                "bits": self._server.params.bits if self._server else None,
                "signed": bool(self._server and self._server.signed),
                "uplink_wire_bytes": up,
                "downlink_wire_bytes": down,
            }
        }
