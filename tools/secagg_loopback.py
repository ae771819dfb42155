"""A Grid that delivers messages to in-process clients running the ClientApp's secagg steps.

The SecAgg+ strategy (strategies/secagg.py) talks to ``LoopbackGrid`` exactly as to Flower's Grid
(``send_and_receive`` of real ``Message`` objects, so the wire counter sees real messages); each
node is a ``LoopbackClient`` holding its secrets between steps as the ClientApp's context.state
does. Tests use it for dropouts and forged replies, the secagg benchmark for timings without
Ray. A step that raises gives an error reply, as Flower does for a failing ClientApp.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from prism_flwr.federated.records import METRICS_KEY
from strategies.secagg import (
    ADVERTISE,
    SHARE,
    UNMASK,
    client_advertise,
    client_mask,
    client_share,
    client_unmask,
)
from tests.support.messages import reply_message

_ids = itertools.count(1)


def reply_to(
    msg: Message, content: RecordDict | None = None, error: str | None = None, src: int | None = None
) -> Message:
    """The reply a node would send to ``msg`` (``src``: a sender other than the addressee)."""
    return reply_message(
        msg.metadata.dst_node_id if src is None else src,
        content,
        error=error,
        message_id=f"r{next(_ids)}",
        reply_to=msg.metadata.message_id or f"m{next(_ids)}",
        group_id="",
        message_type=msg.metadata.message_type,
    )


class LoopbackClient:
    """One node: ``train(msg) -> (0/1 mask, metrics)`` is its training; the rest is the
    ClientApp's secagg steps with the state kept here."""

    def __init__(self, node: int, train: Callable[[Message], tuple[np.ndarray, dict]]) -> None:
        self.node, self.train, self.kept = node, train, None

    def handle(self, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind == ADVERTISE:
            self.kept, reply = client_advertise(msg.content, self.node)
        elif kind == SHARE:
            self.kept, reply = client_share(msg.content, self.kept)
        elif kind == UNMASK:
            reply, self.kept = client_unmask(msg.content, self.kept), None
        else:
            x, metrics = self.train(msg)
            self.kept, records = client_mask(msg.content, self.kept, x)
            reply = RecordDict({**records, METRICS_KEY: MetricRecord(metrics)})
        return reply


class LoopbackGrid:
    """Delivers each message to its node's ``LoopbackClient`` in turn. ``tamper(msg, reply)``
    may replace a reply (a list: several replies, ``[]``: silence) to play a faulty node."""

    def __init__(self, clients: dict[int, LoopbackClient], tamper=None) -> None:
        self.clients, self.tamper = clients, tamper
        self.seconds: dict[str, float] = {}  # client time per message type, all nodes

    def get_node_ids(self):
        return list(self.clients)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            t0 = time.perf_counter()
            try:
                reply = reply_to(msg, self.clients[msg.metadata.dst_node_id].handle(msg))
            except Exception as err:  # noqa: BLE001 - a failing ClientApp gives an error reply
                reply = reply_to(msg, error=f"{type(err).__name__}: {err}")
            kind = msg.metadata.message_type
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
            out = self.tamper(msg, reply) if self.tamper else reply
            replies += out if isinstance(out, list) else [out]
        return replies


def forged(reply: Message, **fields) -> Message:
    """``reply`` with fields of its secagg record replaced (bytes or ints as the record holds)."""
    from strategies.secagg import SECAGG_KEY

    content = RecordDict(dict(reply.content.items()))
    content[SECAGG_KEY] = ConfigRecord({**dict(reply.content[SECAGG_KEY].items()), **fields})
    return Message(metadata=reply.metadata, content=content)
