"""A Grid that delivers messages to in-process nodes running the ClientApp's secagg handlers.

The SecAgg+ strategy (strategies/secagg.py) talks to ``LoopbackGrid`` exactly as to Flower's Grid
(``send_and_receive`` of real ``Message`` objects, so the wire counter sees real messages); each
node is a ``LoopbackClient``: the ClientApp's own handlers (``client_app.secagg_*``) on a
``Context`` of its own (node config, ``context.state``), training replaced by a function that
gives the 0/1 mask. Tests use it for dropouts, forged replies and a deviating server, the secagg
benchmark for timings without Ray. A handler that raises gives an error reply, as Flower does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client_app
from prism_flwr.federated.broadcast import DOWNLINK_KEY, DOWNLINKS, digest, receive
from prism_flwr.federated.records import SCORES_KEY
from prism_flwr.secagg.records import ADVERTISE, CONFIRM, SECAGG_KEY, SHARE, UNMASK
from tests.support.messages import reply_message

HANDLERS = {
    ADVERTISE: client_app.secagg_advertise,
    SHARE: client_app.secagg_share,
    CONFIRM: client_app.secagg_confirm,
    UNMASK: client_app.secagg_unmask,
}

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
    ClientApp's secagg handlers on this node's ``context`` (``node_config``: its own config,
    e.g. signing key, roster and floors)."""

    def __init__(self, node: int, train: Callable[[Message], tuple[np.ndarray, dict]], node_config=None):
        self.node, self.train = node, train
        config = {"partition-id": 0, "num-partitions": 1, **(node_config or {})}
        self.context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})

    def handle(self, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind in HANDLERS:
            return HANDLERS[kind](msg, self.context).content
        x, metrics = self.train(msg)
        return client_app.secagg_train_reply(msg, self.context, x, metrics, self._held(msg, len(x)))

    def _held(self, msg: Message, count: int) -> dict:
        """Under a delta downlink, rebuild the global as the ClientApp does and name it."""
        info = msg.content.config_records.get(DOWNLINK_KEY)
        if info is None:
            return {}
        array = msg.content[SCORES_KEY][SCORES_KEY].numpy()
        self.held = receive(DOWNLINKS["delta"], array, count, info, getattr(self, "held", None))
        return {DOWNLINK_KEY: ConfigRecord({"held": digest(self.held)})}


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
    content = RecordDict(dict(reply.content.items()))
    content[SECAGG_KEY] = ConfigRecord({**dict(reply.content[SECAGG_KEY].items()), **fields})
    return Message(metadata=reply.metadata, content=content)
