"""strategies.prompt_grid: Flower's send-and-receive loop with a short pause between pulls."""

from types import SimpleNamespace

import pytest

from strategies import prompt_grid
from strategies.prompt_grid import PromptGrid


class FakeGrid:
    """Replies to message i arrive at pull number ``arrive[i]``; records every call."""

    def __init__(self, arrive: list[int]) -> None:
        self.arrive, self.pulls, self.pushed, self.closed = arrive, 0, [], False

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"id{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"id{i}"))
            for i, at in enumerate(self.arrive)
            if at == self.pulls and f"id{i}" in set(ids)
        ]

    def close(self):
        self.closed = True


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(prompt_grid.time, "sleep", slept.append)
    return slept


def test_waits_for_every_reply_pausing_between_pulls(sleeps: list[float]) -> None:
    fake = FakeGrid(arrive=[1, 3, 3])
    replies = PromptGrid(fake).send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1", "id2"]
    assert fake.pushed == ["a", "b", "c"] and fake.pulls == 3
    assert sleeps == [prompt_grid.PULL_INTERVAL_S] * 2 and prompt_grid.PULL_INTERVAL_S < 3


def test_timeout_returns_what_came(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(100))
    monkeypatch.setattr(prompt_grid.time, "time", lambda: float(next(clock)))
    monkeypatch.setattr(prompt_grid.time, "sleep", lambda s: None)
    fake = FakeGrid(arrive=[1, 50])
    replies = PromptGrid(fake).send_and_receive(["a", "b"], timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"] and fake.pulls < 10


def test_everything_else_is_the_wrapped_grid() -> None:
    fake = FakeGrid(arrive=[])
    grid = PromptGrid(fake)
    grid.close()
    assert fake.closed and list(grid.push_messages(["x"])) == ["id0"]
