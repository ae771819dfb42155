"""Flower messages built outside Flower, for tests: a node's reply as the ServerApp receives it.

``reply_message(src, content)`` is what ``grid.send_and_receive`` hands a strategy from node
``src``; with ``error`` it is the error reply Flower makes when the ClientApp raised. Building a
``Message`` needs the task identity a running ServerApp has (``task_identity`` fixture).
"""

from __future__ import annotations

import time

from flwr.app import Error, Message, Metadata, RecordDict


def reply_metadata(
    src: int,
    *,
    dst: int = 0,
    message_id: str | None = None,
    reply_to: str = "x",
    group_id: str = "1",
    message_type: str = "train",
) -> Metadata:
    """The metadata of a message from node ``src`` to ``dst`` (0: the ServerApp) answering ``reply_to``."""
    return Metadata(
        run_id=1,
        message_id=f"m{src}" if message_id is None else message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id=group_id,
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )


def reply_message(
    src: int,
    content: RecordDict | None = None,
    *,
    error: str | None = None,
    code: int = 1,
    **metadata: str | int,
) -> Message:
    """Node ``src``'s reply: ``content`` (empty by default), or Flower's error reply (``code``,
    ``error`` as the reason) when ``error`` is given; ``metadata``: see ``reply_metadata``."""
    meta = reply_metadata(src, **metadata)
    if error is not None:
        return Message(metadata=meta, error=Error(code=code, reason=error))
    return Message(metadata=meta, content=content if content is not None else RecordDict())
