"""Every supported combination of options trains; every other one is refused up front.

``prism_flwr/options.py`` says which combinations of ``MATRIX_KEYS`` are supported. Each one runs
here at the smallest size (ngf 2, a 64-image MNIST written in its on-disk format, 2 clients,
2 rounds of 1 local step) through the ServerApp's own strategy (``server_app._strategy``, driven by
Flower's ``Strategy.start``) and the real ClientApp (``client_app.app``: Flower's dispatch of
``train``, ``evaluate`` and the secure-aggregation queries), the messages crossing a serialising
in-process Grid (``tests/support/app_grid.py``). Each round must apply with both clients, move
the global state, and (without DP) gather both clients' evaluation. Every combination the table
leaves out must be refused by ``RunConfig``. The feature extractors that need no download run
with each privacy mode and objective. By default a subset runs that holds every pair of values two
keys can take together (the suite's time budget); ``PRISM_TEST_MATRIX=all`` runs every supported
combination (390 tests, about 40 s on an idle 2-core machine).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

import client_app
import server_app
from prism_flwr import options
from prism_flwr.config import ConfigError, RunConfig
from prism_flwr.federated.methods import method_for
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_flat, layout_fingerprint, num_masked
from tests.support.app_grid import AppGrid
from tests.support.fixtures_data import write_mnist
from tools.gen_config_docs import choices

pytestmark = pytest.mark.usefixtures("task_identity")

CLIENTS, ROUNDS = 2, 2
TINY = {
    "dataset": "mnist",
    "ngf": 2,
    "nz": 8,
    "local-steps": 1,
    "batch-size": 8,
    "num-server-rounds": ROUNDS,
    "min-train-nodes": CLIENTS,
    "eval-every": ROUNDS,
    "device": "cpu",
    "download": False,
    "shards-per-partition": 2,
}


def allowed(key: str) -> list:
    return choices(RunConfig.model_fields[key.replace("-", "_")].annotation)


DEFAULTS = RunConfig().model_dump(by_alias=True)
CHOICES = {key: allowed(key) for key in options.MATRIX_KEYS}
SUPPORTED = options.supported(CHOICES, DEFAULTS)


def _pairs(combo: dict) -> set:
    return {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(options.MATRIX_KEYS, 2)}


def pairwise(combos: list[dict]) -> list[dict]:
    """A subset of ``combos`` holding every pair of values (of two keys) that any of them holds."""
    left, out = set().union(*map(_pairs, combos)), []
    while left:
        best = max(combos, key=lambda c: len(_pairs(c) & left))
        out.append(best)
        left -= _pairs(best)
    return out


# default: a subset covering every pair of values; PRISM_TEST_MATRIX=all: every supported combination
RUN = SUPPORTED if os.environ.get("PRISM_TEST_MATRIX") == "all" else pairwise(SUPPORTED)


def _id(combo: dict) -> str:
    return "-".join(str(combo[k]) for k in options.MATRIX_KEYS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: torch's second thread only spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, "MNIST", n_train=64, n_test=16)
    return root


def run_rounds(run: dict, data_root: Path, state_dir: Path) -> tuple[dict, list[np.ndarray], AppGrid]:
    """``ROUNDS`` rounds of ``run`` through the ServerApp's strategy and the ClientApp; returns the
    strategy's round records, the global state before and after each round, and the grid."""
    cfg = RunConfig.parse(run)
    method = method_for(cfg)
    model = ResnetGenerator(generator_spec(cfg))
    n, layout = num_masked(model), layout_fingerprint(model)
    vector = method.downlink(cfg).settle(get_flat(model, method.vector_attr).numpy())
    strategy = server_app._strategy(cfg, method, n, layout, 0, None)
    nodes = {
        101 + pid: {
            "partition-id": pid,
            "num-partitions": CLIENTS,
            "data-dir": str(data_root),
            "state-dir": str(state_dir),
            "download": "false",
        }
        for pid in range(CLIENTS)
    }
    grid = AppGrid(client_app.app, run, nodes)
    states = []

    def keep(rnd: int, arrays: ArrayRecord) -> None:
        states.append(arrays[method.down_key].numpy().copy())

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({method.down_key: Array(vector)}),
        num_rounds=ROUNDS,
        timeout=60.0,
        train_config=ConfigRecord({"run-tag": "0123abcd"}),
        evaluate_fn=keep,
    )
    return strategy.round_records, states, grid


def check_rounds(records: dict, states: list[np.ndarray], run: dict) -> None:
    cfg = RunConfig.parse(run)
    assert sorted(records) == list(range(1, ROUNDS + 1))
    for rnd, rec in records.items():
        assert not rec["skipped"], (rnd, rec.get("skip_reason"), rec["dropped"])
        assert rec["clients"] == CLIENTS and rec["dropped"] == [], rec
        if rec.get("mada_lambda") != 0.0:  # mada-change keeps the global when the change is all noise
            assert not np.array_equal(states[rnd], states[rnd - 1]), f"round {rnd} left the global unchanged"
        assert np.isfinite(states[rnd]).all()
    last = records[ROUNDS]
    if cfg.dp == "off":  # evaluation replies of both clients (none asked under DP)
        assert "client_eval" in last and "client_eval_dropped" not in last, last
    if cfg.secure_aggregation != "off":
        assert all(r["secagg_contributors"] == CLIENTS for r in records.values())


def test_the_table_leaves_combinations_of_every_value() -> None:
    for key, values in CHOICES.items():
        assert {c[key] for c in SUPPORTED} == set(values), key
    assert len(SUPPORTED) == len({_id(c) for c in SUPPORTED})
    assert set().union(*map(_pairs, pairwise(SUPPORTED))) == set().union(*map(_pairs, SUPPORTED))


@pytest.mark.parametrize("combo", RUN, ids=_id)
def test_every_supported_combination_trains(combo: dict, data_root: Path, tmp_path: Path) -> None:
    run = {**TINY, **combo}
    records, states, grid = run_rounds(run, data_root, tmp_path / "state")
    check_rounds(records, states, run)
    assert grid.counts["train"] == CLIENTS * ROUNDS


def test_every_other_combination_is_refused() -> None:
    supported = {_id(c) for c in SUPPORTED}
    keys = list(CHOICES)
    refused = 0
    for values in itertools.product(*CHOICES.values()):
        combo = dict(zip(keys, values))
        canonical = options.canonical({**DEFAULTS, **combo}, DEFAULTS)
        if _id(canonical) in supported:
            RunConfig.parse(combo)
            continue
        refused += 1
        with pytest.raises(ConfigError) as err:
            RunConfig.parse(combo)
        assert "\n" not in str(err.value) and "is not supported" in str(err.value)
    assert refused > 0


@pytest.mark.parametrize("features", ["pixels", "random-conv"])
@pytest.mark.parametrize(
    "dp, objective",
    [
        (dp, obj)
        for dp in allowed("dp")
        for obj in allowed("objective")
        if options.refusal({**DEFAULTS, "dp": dp, "objective": obj}) is None
    ],
)
def test_features_with_every_privacy_mode(
    features: str, dp: str, objective: str, data_root: Path, tmp_path: Path
) -> None:
    run = {**TINY, "features": features, "dp": dp, "objective": objective}
    records, states, _ = run_rounds(run, data_root, tmp_path / "state")
    check_rounds(records, states, run)


def test_a_run_that_learns_nothing_ends_failed(data_root: Path, tmp_path: Path) -> None:
    """The ServerApp's main with nodes that refuse the run (below their privacy floor): every
    round is skipped, and the run fails with the last skip's reason instead of completing."""
    run = {
        **TINY,
        "data-dir": str(data_root),
        "output-dir": str(tmp_path / "out"),
        "eval-samples": 8,
        "eval-feature-metrics": False,
    }
    nodes = {
        101 + pid: {
            "partition-id": pid,
            "num-partitions": CLIENTS,
            "data-dir": str(data_root),
            "state-dir": str(tmp_path / "state"),
            "min-dp": "theta",
        }
        for pid in range(CLIENTS)
    }
    grid = AppGrid(client_app.app, run, nodes)
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run)
    with pytest.raises(server_app.NothingLearned) as err:
        server_app.main(grid, context)
    assert str(err.value).startswith(
        f"no round applied: all {ROUNDS} rounds were skipped; "
        f"the last (round {ROUNDS}): 0 valid replies, min-train-nodes is {CLIENTS}; nodes said: "
    )
    assert "node refuses the run: dp='off' is weaker than this node's floor" in str(err.value)
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.is_symlink()]
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["skipped"] for r in history] == [False] + [True] * ROUNDS  # round 0: the start
    assert all("weaker than this node's floor" in d for r in history[1:] for d in r["dropped"])
    assert not (run_dir / "model.prism").exists() and not (run_dir / "summary.json").exists()
