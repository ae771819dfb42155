"""The ServerApp's Grid, asking for replies every 0.2 s instead of every 3 s.

Flower 1.42's ``HttpGrid.send_and_receive`` (the Grid a ServerApp gets, in the deployment engine
and in the simulation alike) pushes a round's messages, then pulls replies and sleeps 3 s between
pulls. A round therefore ends up to 3 s after its last reply came in: most of a round on a GPU,
where ten clients train 100 steps in a few seconds. ``PromptGrid`` wraps that Grid and changes
only the pause between pulls (one small request to the SuperLink beside the ServerApp); pushing,
pulling and the meaning of ``timeout`` (``None``: wait for every reply) are Flower's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.2


class PromptGrid(Grid):
    def __init__(self, grid: Grid, pull_interval: float = PULL_INTERVAL_S) -> None:
        self._grid = grid
        self.pull_interval = pull_interval

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def __getattr__(self, name: str):  # anything else Flower's Grid offers (close, ...)
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's loop (push, then pull until every reply is in or ``timeout`` passes), pausing
        ``pull_interval`` seconds between pulls."""
        waiting = set(self.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(self.pull_interval)
        return replies
