"""Bytes on the wire, counted the way Flower 1.42 sends a ``Message``.

Flower 1.42 does not send a message as one protobuf. The sender pushes (ServerApp -> SuperLink
``PushMessages``/``PushObject``; ClientApp -> SuperNode -> SuperLink likewise) and the receiver
pulls (``PullMessages``/``PullObject``):

1. the message without its content (``message_to_proto(remove_content_from_message(msg))``)
   and its object tree (``get_object_tree(msg)``: the object ids, parent to children);
2. every object of the tree once (``get_all_nested_objects``: Message, RecordDict, each record,
   each Array, each ArrayChunk of at most 5 MiB), as its ``deflate()`` bytes: a short text head
   (class name, child ids, body length) and the body. An ``Array`` built from a numpy array
   holds the ``.npy`` serialisation (about 128 bytes of header + the raw data) in its chunks.

``message_wire_bytes`` is 1 + 2: the bytes Flower serialises for one message, what a node
receives or sends for it. Not counted: gRPC/HTTP framing and the per-RPC ids (object id, node,
run, session; about 100 bytes per object). ``content_bytes`` is what Flower's own
``message_size_mod`` logs (``sum(record.count_bytes())``: array data + key names only), kept for
comparison. One global vector sent to 10 nodes is 10 downlinks: each node pulls every object.

Flower internals used (checked against the pin in prism_flwr/deployment/flower_pin.py before they
are imported): ``flwr.app.message.message.remove_content_from_message``,
``flwr.common.serde.message_to_proto``, and from ``flwr.supercore.inflatable.inflatable_object``
``InflatableObject``, ``get_all_nested_objects``, ``get_object_tree``.
"""

from __future__ import annotations

from prism_flwr.deployment.flower_pin import require_flower

require_flower("the wire-byte counter (strategies/wire.py)")

from flwr.app import Message  # noqa: E402
from flwr.app.message.message import remove_content_from_message  # noqa: E402
from flwr.common.serde import message_to_proto  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    InflatableObject,
    get_all_nested_objects,
    get_object_tree,
)


def object_bytes(obj: InflatableObject) -> int:
    """Deflated bytes of ``obj`` and everything nested in it, each distinct object once
    (a ``RecordDict``, ``ArrayRecord``, ``Array``, ``ArrayChunk`` or a whole ``Message``)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def envelope_bytes(msg: Message) -> int:
    """The content-less message protobuf and the object tree sent with it."""
    return message_to_proto(remove_content_from_message(msg)).ByteSize() + get_object_tree(msg).ByteSize()


def message_wire_bytes(msg: Message) -> int:
    """Serialised size of ``msg`` as Flower 1.42 transfers it: envelope + every object once."""
    return envelope_bytes(msg) + object_bytes(msg)


def content_bytes(msg: Message) -> int:
    """The figure Flower's ``message_size_mod`` logs: ``sum(record.count_bytes())``."""
    return sum(record.count_bytes() for record in msg.content.values()) if msg.has_content() else 0


def bits_per_weight(num_bytes: int, num_weights: int) -> float:
    if num_weights < 1:
        raise ValueError(f"num_weights must be positive, got {num_weights}")
    return 8.0 * num_bytes / num_weights
