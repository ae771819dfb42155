"""The in-process runner is the Flower app without Flower: same rounds, same numbers.

One tiny configuration, under ``mada`` (whose lambda comes from the server's Bernoulli sampling
stream) and ``mada-change``, runs through `flwr run` (Ray simulation, 2 clients, 2 rounds; both
rules at once, the in-process runner meanwhile in the test's process) and through
``prism_flwr.federated.inprocess.run``: every round's loss, lambda and its diagnostics agree, because both
call the same client round (``client_round``) and the same server step (``combine_masks``) with
the same seeds (the clients' mask secrets from one test seed on both sides). Also a smoke run of
the GPU benchmark and the aggregation study at their tiny sizes (on the CPU here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prism_flwr.config import RunConfig
from prism_flwr.federated import inprocess
from tests.support.simulation import TINY, Simulation


def _history(out: Path) -> list[dict]:
    path = next(p for p in [out / "history.json", *sorted(out.glob("*/history.json"))] if p.is_file())
    return json.loads(path.read_text())


RULES = ("mada", "mada-change")  # mada: the server's Bernoulli sampling stream; mada-change: none


def test_inprocess_run_matches_flwr_run(
    seeded_simulation: Simulation, data_dir: Path, tmp_path: Path
) -> None:
    configs = {}
    for rule in RULES:
        keys = dict(item.split("=") for item in TINY.split())
        keys.update(
            {
                "num-server-rounds": "2",
                "eval-every": "2",
                "fraction-evaluate": "0.0",
                "aggregation": f"'{rule}'",
            }
        )
        configs[rule] = keys
    sim = seeded_simulation  # one SuperLink for this test run's seeded runs, one run per rule, both at once
    started = {}
    for rule, keys in configs.items():
        out = tmp_path / f"out-{rule}"
        config = " ".join(f"{k}={v}" for k, v in keys.items()) + f" output-dir='{out}' data-dir='{data_dir}'"
        started[rule] = sim.start_run(config, nodes=2)

    local = {}  # the in-process runner's rounds, computed while Flower runs
    for rule, keys in configs.items():
        cfg = RunConfig.parse(
            {
                **{k: json.loads(v.replace("'", '"')) for k, v in keys.items()},
                "data-dir": str(data_dir),
                "output-dir": str(tmp_path / "unused"),
            }
        )
        local[rule] = inprocess.run(cfg, 2, insecure_test_mask_seed=5)[1:]

    for rule in configs:
        assert sim.wait(started[rule])["status"] == "finished:completed", sim.logs_tail()
        flower = [r for r in _history(tmp_path / f"out-{rule}") if r["round"] >= 1]
        assert len(flower) == len(local[rule]) == 2
        for f, loc in zip(flower, local[rule]):
            for key in ("loss", "mada_lambda", "lambda_no_change", "theta_change_sq", "uplink_bytes"):
                assert f[key] == pytest.approx(loc[key], rel=1e-6, abs=1e-9), (rule, key, f, loc)


def test_bench_gpu_tiny_prints_its_table() -> None:
    from benchmarks import bench_gpu

    out = bench_gpu.main(["--size", "tiny", "--device", "cpu"])
    row = out["rows"][0]
    assert row["width"] == 4 and row["landed_ms_per_step"] > 0 and row["eager_ms_per_step"] > 0
    assert out["round"]["clients"] == 2 and out["round"]["round_seconds"] > 0


def test_aggregation_study_tiny_writes_its_report(tmp_path: Path) -> None:
    from experiments import aggregation_study

    res = aggregation_study.main(
        [
            "--size",
            "tiny",
            "--out",
            str(tmp_path),
            "--seeds",
            "30",
            "--partitionings",
            "shards",
            "--rules",
            "mada",
            "mean",
            "adam",
        ]
    )
    assert "| shards | adam | 1 |" in res["table"] and res["metric"] == "mmd_pixels"
    assert (tmp_path / "quality_vs_rounds.png").stat().st_size > 0
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("rule", ["mada", "adam"])
def test_the_strategy_takes_the_shared_server_step_on_the_documented_streams(rule: str) -> None:
    """MADA's round equals ``server_step`` (what the runner calls) on the same counts, and both
    equal the step written out: the rule on ``default_rng([seed, round])``, then the grid's
    settling on ``default_rng([seed, round, 8])``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from prism_flwr.federated.aggregation import Aggregator, count_ones
    from prism_flwr.federated.broadcast import DOWNLINKS
    from prism_flwr.federated.codec import encode_mask
    from prism_flwr.federated.downlink import snap_to_grid
    from prism_flwr.federated.records import SCORES_KEY
    from prism_flwr.federated.server_step import server_step
    from strategies.mada import MADA
    from tests.test_strategy import LAYOUT, SCORES, FakeGrid, N, mask, reply

    seed, rnd, masks = 5, 3, [mask(i) for i in range(4)]
    strategy = MADA(num_weights=N, layout=LAYOUT, rule=rule, seed=seed, downlink=DOWNLINKS["grid8"])
    strategy.configure_train(
        rnd, ArrayRecord({SCORES_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid([1, 2, 3, 4])
    )
    arrays, _ = strategy.aggregate_train(
        rnd, [reply(i + 1, encode_mask(m, LAYOUT)) for i, m in enumerate(masks)]
    )
    counts, k = count_ones((np.packbits(m, bitorder="little") for m in masks), N)
    proposed = Aggregator(rule).propose(SCORES, counts, k, rng=np.random.default_rng([seed, rnd]))
    by_hand = snap_to_grid(proposed.scores, np.random.default_rng([seed, rnd, 8]))
    shared = server_step(Aggregator(rule), SCORES, counts, k, DOWNLINKS["grid8"], seed, rnd).scores
    np.testing.assert_array_equal(arrays[SCORES_KEY].numpy(), by_hand)
    np.testing.assert_array_equal(shared, by_hand)
