"""The experiments report (experiments/report.py): series, equal-uplink selection, table, plots."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.report import run_series, table, value_at_budget, write_report

METRIC = "FD-FMNIST-CNN"


def _history(up_per_client: int, values: dict[int, float], rounds: int = 2, clients: int = 2) -> list[dict]:
    """A history.json: round 0 untrained, then ``rounds`` rounds; eval only where ``values`` has one."""
    recs = [
        {"round": r, "clients": clients if r else 0, "uplink_bytes": up_per_client * clients if r else 0}
        for r in range(rounds + 1)
    ]
    for rec in recs:
        if rec["round"] in values:
            rec["eval"] = {METRIC: values[rec["round"]]}
    return recs


def _row(method: str, seed: int, history: list[dict], lam: float | None = None) -> dict:
    series = run_series(history, METRIC)
    return {
        "partitioning": "iid",
        "method": method,
        "seed": seed,
        "series": series,
        "final": {METRIC: series[-1]["value"], "recall": 0.1, "coverage": 0.2},
        "uplink_bytes_per_client_round": history[-1]["uplink_bytes"] / 2,
        "uplink_bits_per_weight": 1.0,
        "downlink_bytes_per_client_round": 4.0,
        "mean_lambda": lam,
        "model_bytes": 100,
        "wall_seconds": 10.0,
    }


def test_series_accumulates_uplink_per_client_and_keeps_evaluated_rounds() -> None:
    series = run_series(_history(1_000_000, {0: 300.0, 2: 200.0}), METRIC)
    assert series == [
        {"round": 0, "uplink_mb": 0.0, "total_mb": 0.0, "value": 300.0},
        {"round": 2, "uplink_mb": 2.0, "total_mb": 2.0, "value": 200.0},
    ]


def test_series_total_adds_the_downlink_per_client_asked() -> None:
    history = _history(1_000_000, {2: 200.0})
    for rec in history[1:]:
        rec.update({"asked": 4, "downlink_bytes": 4 * 3_000_000})  # 3 MB to each of the 4 asked
    assert run_series(history, METRIC) == [{"round": 2, "uplink_mb": 2.0, "total_mb": 8.0, "value": 200.0}]


def test_value_at_budget_takes_the_last_point_within_it() -> None:
    series = run_series(_history(1_000_000, {0: 300.0, 1: 250.0, 2: 200.0}), METRIC)
    assert value_at_budget(series, 0.5)["round"] == 0
    assert value_at_budget(series, 1.0)["round"] == 1
    assert value_at_budget(series, 99.0)["value"] == 200.0


def test_table_compares_at_equal_rounds_and_equal_uplink() -> None:
    # PRISM sends 1 MB per round, dense 32 MB: at PRISM's 2 MB dense is still untrained (round 0);
    # at dense's first round (32 MB) PRISM shows its last round.
    rows = [
        _row("mada", s, _history(1_000_000, {0: 300.0, 1: 260.0 + s, 2: 240.0 + s}), lam=0.2 + s / 100)
        for s in (0, 2)
    ]
    rows += [_row("dense", s, _history(32_000_000, {0: 300.0, 1: 220.0 + s, 2: 200.0 + s})) for s in (0, 2)]
    lines = table(rows, METRIC).splitlines()
    assert "at 2 MB/client uplink" in lines[0] and "at 32 MB/client uplink" in lines[0]
    mada = lines[2].split(" | ")
    dense = lines[3].split(" | ")
    assert mada[2] == "241 ± 1.4" and dense[2] == "201 ± 1.4"  # after the last round
    assert mada[5] == "241 ± 1.4 (r2)" and dense[5] == "300 ± 0 (r0)"  # at PRISM's total uplink
    assert mada[6] == "241 ± 1.4 (r2)" and dense[6] == "221 ± 1.4 (r1)"  # at one dense round
    assert mada[7] == "0.21 ± 0.014" and dense[7] == "-"  # mean lambda


def test_write_report_writes_table_and_two_pngs(tmp_path: Path) -> None:
    rows = [
        _row(m, s, _history(b, {0: 300.0, 1: 250.0 + s, 2: 230.0 + s}))
        for m, b in (("mada", 1_000_000), ("dense", 32_000_000))
        for s in (0, 1)
    ]
    doc = {
        "settings": {"ngf": 8},
        "seeds": [0, 1],
        "metric": METRIC,
        "machine": {"cpus": 2},
        "total_wall_seconds": 90.0,
        "rows": rows,
    }
    (tmp_path / "experiments.json").write_text(json.dumps(doc))
    write_report(tmp_path)
    text = (tmp_path / "experiments.md").read_text()
    assert "| iid | dense |" in text and "the runs took 1.5 min in all" in text
    for name in ("quality_vs_rounds.png", "quality_vs_uplink.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
