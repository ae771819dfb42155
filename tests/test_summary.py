"""prism_flwr.evaluation.summary: the closing text of a run, from history records and the summary dict."""

from __future__ import annotations

from pathlib import Path

from prism_flwr.evaluation.summary import closing_summary, human_bytes, human_seconds


def _history() -> list[dict]:
    r0 = {
        "round": 0,
        "uplink_bytes": 0,
        "downlink_bytes": 0,
        "eval": {
            "FD-FMNIST-CNN": 324.9,
            "precision": 0.61,
            "recall": 0.0,
            "density": 0.2,
            "coverage": 0.029,
            "mmd_pixels": 0.781,
        },
    }
    rounds = [
        {
            "round": r,
            "uplink_bytes": 4 * 52_300,
            "uplink_bits_per_weight": 1.00054,
            "downlink_bytes": 4 * 1_672_768,
        }
        for r in (1, 2, 3)
    ]
    rounds[-1]["eval"] = {
        "FD-FMNIST-CNN": 120.5,
        "precision": 0.7,
        "recall": 0.15,
        "density": 0.5,
        "coverage": 0.3,
        "mmd_pixels": 0.021,
    }
    return [r0, *rounds]


SUMMARY = {
    "method": "prism",
    "rounds": 3,
    "wall_seconds": 151.4,
    "model_bytes": 52_416,
    "dense_float32_bytes": 1_672_768,
    "density": 0.5,
    "dp": "off",
    "dp_epsilon_per_client": None,
}


def test_summary_names_outputs_metrics_sizes_and_the_sample_command(tmp_path: Path) -> None:
    out = tmp_path / "my outputs"
    text = closing_summary(_history(), out, SUMMARY)
    lines = text.splitlines()
    assert lines[0] == f"PRISM run finished: 3 rounds in 2 min 31 s. Outputs in {out}:"
    assert (
        "  model.prism        the exported model: frozen seed + 1-bit mask, 52.4 kB "
        "(dense float32: 1.7 MB, 32x larger)"
    ) in lines
    assert any(line.startswith("  samples/ ") and "at each of the 2 evaluations" in line for line in lines)
    assert "Quality, round 0 (untrained) -> round 3:" in lines
    fd = next(line for line in lines if line.strip().startswith("FD-FMNIST-CNN"))
    assert fd.split()[1:3] == ["324.9", "120.5"] and fd.endswith("(lower is better)")
    recall = next(line for line in lines if line.strip().startswith("recall"))
    assert recall.split()[1:3] == ["0", "0.15"] and recall.endswith("(higher is better)")
    # the table keeps FD first, then precision, recall, density, coverage, then the rest
    names = [
        line.split()[0] for line in lines[lines.index("Quality, round 0 (untrained) -> round 3:") + 2 :][:6]
    ]
    assert names == ["FD-FMNIST-CNN", "precision", "recall", "density", "coverage", "mmd_pixels"]
    # 3 rounds of 4 clients: 627.6 kB up, 20.1 MB down
    assert "Traffic: 627.6 kB up, 20.1 MB down in total (1.00054 bits per weight up)." in lines
    assert lines[-2:] == [
        "Draw samples from the exported model:",
        f"  prism-flwr sample '{out}/model.prism' --n 64 --out grid.png",
    ]


def test_summary_without_evaluation_or_traffic(tmp_path: Path) -> None:
    history = [{"round": 0}, {"round": 1, "uplink_bytes": 0, "downlink_bytes": 0}]
    text = closing_summary(history, tmp_path, {"method": "prism", "rounds": 1})
    assert "Quality: no evaluation recorded." in text
    assert "Traffic" not in text and "samples/" not in text
    assert text.splitlines()[0] == f"PRISM run finished: 1 rounds. Outputs in {tmp_path}:"


def test_dense_baseline_and_dp(tmp_path: Path) -> None:
    summary = {**SUMMARY, "method": "dense", "model_bytes": 1_672_800, "dp": "off"}
    text = closing_summary(_history(), tmp_path, summary)
    assert "model-dense.pt" in text and "prism-flwr sample reads .prism files only" in text
    assert "dense float32:" not in text
    dp = closing_summary(
        _history(), tmp_path, {**SUMMARY, "dp": "theta", "dp_epsilon_per_client": {"1": 2.5, "2": 9.8}}
    )
    assert "Privacy: dp = theta, largest epsilon spent by a client 9.8" in dp


def test_human_units() -> None:
    assert [human_bytes(n) for n in (999, 1000, 52_416, 6_690_000, 3e9)] == [
        "999 B",
        "1.0 kB",
        "52.4 kB",
        "6.7 MB",
        "3.0 GB",
    ]
    assert [human_seconds(s) for s in (4.4, 59.6, 245)] == ["4 s", "1 min 0 s", "4 min 5 s"]
