"""prism_flwr.progress: periodic lines for long waits, silence for short ones."""

from __future__ import annotations

import io

from prism_flwr.progress import Progress, eta_text


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_period_with_share_and_estimate() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress("classifier", 160, "steps", every=5.0, stream=out, clock=clock)
    for step in range(160):
        clock.t += 0.125  # 20 s of work in all (binary-exact steps)
        p.update(step, "epoch 1/1")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 + 1  # at 5, 10, 15, 20 s, then the closing line
    assert lines[0] == "classifier: 39/160 steps (24 %), epoch 1/1, 5 s elapsed, about 16 s left"
    assert lines[-1] == "classifier: done in 20 s"


def test_short_work_prints_nothing() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress("quick", 10, every=5.0, stream=out, clock=clock)
    for i in range(10):
        clock.t += 0.4
        p.update(i)
    p.close()
    assert out.getvalue() == ""


def test_eta_text() -> None:
    assert eta_text(0, 10, 3.0) == "3 s elapsed"
    assert eta_text(5, 10, 3.0) == "3 s elapsed, about 3 s left"
    assert eta_text(10, 10, 6.0) == "6 s elapsed"
