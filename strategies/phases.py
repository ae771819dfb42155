"""The phases a round may add around its training, as hooks of ``RecordingFedAvg``.

A round whose training is wrapped in exchanges of its own (secure aggregation's masked sum: set
up keys, train, confirm and unmask) overrides these instead of the base's internals; the base
calls them in order: ``setup_train`` before the training messages, ``read_reply`` per training
reply, ``finish_train`` between the valid replies and ``combine``, ``round_notes`` and
``close_record`` when the round's record is complete. ``exchange`` is how a hook talks to the
nodes; its messages count in the round's wire bytes.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Array, Message, RecordDict
from flwr.common import log

from prism_flwr.federated.aggregation import AggregationError

from .replies import reason
from .wire import message_wire_bytes


def wire_bytes(messages: list[Message]) -> int | None:
    """Serialised bytes of ``messages`` as Flower sends them; None (and a log line) if a message
    cannot be counted: a byte count never ends a round."""
    try:
        return sum(message_wire_bytes(m) for m in messages)
    except Exception as err:  # noqa: BLE001
        log(WARNING, "wire bytes not counted: %s", reason(err))
        return None


def with_records(messages: list[Message], extras: dict[int, dict]) -> list[Message]:
    """Each message with the extra records ``extras`` names for its node."""
    return [
        Message(
            content=RecordDict({**dict(m.content.items()), **extra}),
            dst_node_id=m.metadata.dst_node_id,
            message_type=m.metadata.message_type,
        )
        if (extra := extras.get(m.metadata.dst_node_id))
        else m
        for m in messages
    ]


class PhasedRound:
    """Default hooks (a plain round) and the bookkeeping of the exchanges a hook makes."""

    num_weights: int
    _grid = None  # this round's grid (set by the base's ``configure_train``)
    _sampled = 0  # nodes sampled this round (asked to take part, trained or not)
    _setup_skip: str | None = None  # why ``setup_train`` skipped this round
    side_wire_bytes: list[int]  # (down, up) wire bytes of this round's ``exchange`` messages

    def start_phases(self, rnd: int, grid, nodes: list[int]) -> dict[int, dict]:
        """A new round on ``grid`` with ``nodes`` sampled: ``setup_train``'s nodes and records
        (none, and the reason kept for the record, when it skips the round)."""
        self._grid, self._sampled, self._setup_skip, self.side_wire_bytes = grid, len(nodes), None, [0, 0]
        try:
            return self.setup_train(rnd, nodes) if nodes else {}
        except AggregationError as err:
            log(WARNING, "round %d: set-up failed: %s", rnd, reason(err))
            self._setup_skip = reason(err)
            return {}

    def setup_train(self, rnd: int, nodes: list[int]) -> dict[int, dict]:
        """Before the training messages: the nodes of ``nodes`` (those sampled) that train, each
        with the extra records its message carries. Raise ``AggregationError`` to skip the round
        (no training message goes out). Default: every sampled node, nothing extra."""
        return {u: {} for u in nodes}

    def read_reply(self, msg: Message, array: Array) -> object:
        """What ``finish_train`` gets of one training reply whose records passed the checks."""
        return self.decode(array)

    def finish_train(self, rnd: int, payloads: list) -> object:
        """Between the valid replies and ``combine`` (e.g. the unmasking of a secure sum); raise
        ``AggregationError`` to skip the round. Default: the payloads as they are."""
        return payloads

    def round_notes(self) -> dict:
        """Fields of its own this round adds to its ``history.json`` record (default: none)."""
        return {}

    def exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        """Send ``messages`` to this round's nodes and wait for the replies (a hook's own phase);
        both ways count in the round's wire bytes."""
        self.side_wire_bytes[0] += wire_bytes(messages) or 0
        replies = list(self._grid.send_and_receive(messages, timeout=timeout)) if messages else []
        self.side_wire_bytes[1] += (wire_bytes(replies) or 0) if replies else 0
        return replies

    def close_record(self, record: dict) -> None:
        """The hooks' notes, and the ``exchange`` messages in the wire counts, per sampled node."""
        record.update(self.round_notes())
        down, up = self.side_wire_bytes
        if not (down or up):
            return
        record["uplink_wire_bytes"] = record.get("uplink_wire_bytes", 0) + up
        record["downlink_wire_bytes"] = (record.get("downlink_wire_bytes") or 0) + down
        if self._sampled:
            per_client = {k: record[f"{k}link_wire_bytes"] / self._sampled for k in ("up", "down")}
            record["wire_bytes_per_client"] = per_client
            record["wire_bits_per_weight_up"] = 8 * per_client["up"] / self.num_weights
            record["wire_bits_per_weight_down"] = 8 * per_client["down"] / self.num_weights
