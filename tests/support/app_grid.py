"""A Grid that delivers every message to a ClientApp in this process, one node per Context.

``AppGrid`` stands in for the SuperLink and the SuperNodes: each message (any type: ``train``,
``evaluate``, ``query.*``) gets a message id, crosses a "wire" (deflated into Flower's object
bytes and inflated again, both ways), and goes to ``app(message, context)``, Flower's own
dispatch by message type, with the node's ``Context`` (run config, node config, a
``context.state`` kept across rounds). A handler that raises gives the error reply a SuperNode
sends. Nodes answer one after another; ``timeout`` is ignored (nobody is slow here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents


def over_the_wire(msg: Message) -> Message:
    """``msg`` as the receiver gets it: every object deflated to bytes and inflated again."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    copy = inflate_object_from_contents(msg.object_id, contents)
    copy.metadata.__dict__["_message_id"] = msg.metadata.message_id  # travels beside the objects
    return copy


class AppGrid(Grid):
    def __init__(
        self, app, run_config: Mapping, node_configs: Mapping[int, Mapping], run_id: int = 1
    ) -> None:
        self.app = app
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node, config in node_configs.items()
        }
        self.counts: dict[str, int] = {}  # messages delivered, per message type
        self._run = None
        self._replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    # ------------------------------------------------------------------ what Flower's Grid offers
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Delivers each message at once; its reply waits to be pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what the SuperLink does on push
            self._replies[msg.metadata.message_id] = self.deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------ one message
    def deliver(self, msg: Message) -> Message:
        """The node's reply to ``msg`` (pushed) as the server receives it."""
        kind = msg.metadata.message_type
        self.counts[kind] = self.counts.get(kind, 0) + 1
        received = over_the_wire(msg)
        try:
            reply = self.app(received, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - what a SuperNode makes of a failing ClientApp
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=received
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return over_the_wire(reply)
