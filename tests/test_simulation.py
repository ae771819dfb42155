"""The real app on Flower's simulation engine (Ray): end to end, bad config, failures, kill + resume.

Simulation SuperLinks on free ports with private FLWR_HOMEs (tests/support/simulation.py): runs
that need no node settings of their own share one per module; the others start theirs. Tiny
sizes (ngf 4, a few local steps) keep each run to tens of seconds on 2 cores, most of them
Flower's and Ray's start-up: independent runs go two at a time (the faulty run beside the bad
config; the statistics and the dense runs; the uninterrupted run beside the one that crashes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_flwr.federated.codec import HEADER_BYTES
from prism_flwr.federated.export import load_sparse_model
from prism_flwr.model.generator import generate
from prism_flwr.model.masked import num_masked
from prism_flwr.storage.checkpoint import load_checkpoint
from tests.support.fault_client_app import FAULT_ENV, fault_app_dir
from tests.support.simulation import RUN_TIMEOUT, TINY, Simulation, rounds_of
from tools import procs
from tools.flowerkit import exe


@pytest.fixture(scope="module")
def plain_simulation(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One simulation SuperLink for this module's runs that need no node settings of their own (a
    bad config, statistics under DP, the dense baseline): the nodes' state in one module folder."""
    with procs.Processes() as ps:
        yield Simulation(tmp_path_factory.mktemp("plain-sim"), ps, data_dir=data_dir)
    procs.assert_gone(ps.pids)


@pytest.fixture(scope="module")
def plain_runs(plain_simulation: Simulation, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The statistics and the dense baseline runs, started together on the plain SuperLink by the
    first test that reads one (each run has its own Ray cluster and run tag); each test waits for
    its own: name -> (its `flwr run` process, its output folder)."""
    root = tmp_path_factory.mktemp("plain-runs")
    configs = {
        "statistics": _dp_config("statistics", root / "statistics", data_dir),
        "dense": f"num-server-rounds=2 eval-every=2 {TINY} method='dense' output-dir='{root / 'dense'}' "
        f"data-dir='{data_dir}'",
    }
    return {
        name: (plain_simulation.start_run(config, nodes=2), root / name) for name, config in configs.items()
    }


@pytest.fixture(scope="module")
def faulty_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The end-to-end run with failing and corrupt clients, on a SuperLink of its own (the app behind
    a fault-injecting mod), started by the bad-config test so that it goes beside that test's run:
    (its Simulation, its `flwr run` process, its output folder)."""
    tmp = tmp_path_factory.mktemp("faulty-sim")
    with procs.Processes() as ps:
        sim = Simulation(
            tmp,
            ps,
            extra_env={FAULT_ENV: "raise=1 corrupt=2"},
            data_dir=data_dir,
            app=fault_app_dir(tmp / "app"),
        )
        config = f"num-server-rounds=2 eval-every=1 aggregation='mada' {TINY} data-dir='{data_dir}'"
        yield sim, sim.start_run(f"{config} output-dir='{tmp / 'out'}'", nodes=4), tmp / "out"
    procs.assert_gone(ps.pids)


BAD_CONFIGS = [
    (
        "dataset='foo'",
        "run-config key 'dataset' = 'foo': Input should be 'mnist', 'fmnist', 'cifar10' or 'celeba'",
    ),
    ("ngf=-1", "run-config key 'ngf' = -1: Input should be greater than or equal to 1"),
    ("lr='fast'", "run-config key 'lr' = 'fast': Input should be a valid number"),
]


@pytest.mark.usefixtures("faulty_run")  # started here: it goes beside this test's run
def test_bad_run_config_fails_before_training(
    plain_simulation: Simulation, data_dir: Path, tmp_path: Path
) -> None:
    """A choice, a range and a type error in one run: it ends failed with one line naming each,
    nothing trained (the config is checked as a whole, so one run answers for all three)."""
    sim, out = plain_simulation, tmp_path / "out"
    bad = " ".join(key for key, _ in BAD_CONFIGS)
    run = sim.run(f"{bad} output-dir='{out}' data-dir='{data_dir}'", nodes=2)
    status = subprocess.run(
        [exe("prism-flwr"), "last-run", "sim"],
        env=sim.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=sim.home,
    )
    assert run["status"] == "finished:failed", run
    assert status.returncode == 1
    for _, line in BAD_CONFIGS:
        assert line in run["status-details"] and line in status.stdout, (line, run)
    assert not out.exists()  # nothing trained, nothing written


def test_simulation_end_to_end_with_failing_and_corrupt_clients(faulty_run) -> None:
    """4 clients, one raising every round and one uploading a corrupt mask: the run completes on
    the other two, history shows both dropped with their reasons, the model loads and samples."""
    sim, proc, out = faulty_run
    run = sim.wait(proc)
    assert run["status"] == "finished:completed", sim.logs_tail()

    rounds = rounds_of(out)
    assert [r["round"] for r in rounds] == [1, 2]
    model, header = load_sparse_model(out / "latest" / "model.prism")
    weights = num_masked(model)
    limit = 8 * (HEADER_BYTES + (weights + 7) // 8) / weights  # 1 bit per weight plus the header
    for r in rounds:
        assert r["clients"] == 2 and r["asked"] == 4 and not r["skipped"], r
        reasons = " ".join(r["dropped"])
        assert len(r["dropped"]) == 2 and "fails on purpose" in reasons and "checksum mismatch" in reasons, r
        assert 0.0 < r["uplink_bits_per_weight"] <= limit, (
            r,
            limit,
        )  # coded: below 1 bit per weight once theta moves
        assert 0.0 <= r["mada_lambda"] <= 1.0
        assert np.isfinite(r["loss"]) and "mmd_pixels" in r["eval"] and "local_mmd_pixels" in r["client_eval"]
        assert len(r["label_histograms"]) == 2 and all(
            sum(h) == 15_000 for h in r["label_histograms"].values()
        )
    images = generate(model, 8, seed=0)
    assert images.shape == (8, 1, 32, 32) and torch.isfinite(images).all()
    assert header["generator"] == {"nz": 128, "ngf": 4, "nc": 1, "seed": 30}
    assert (out / "latest" / "samples.png").stat().st_size > 0 and (
        out / "latest" / "history.png"
    ).stat().st_size > 0
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["model_bytes"] < summary["dense_float32_bytes"] / 20


def test_kill_and_resume_matches_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    rounds = 4
    config = f"num-server-rounds={rounds} {TINY} eval-every=2 data-dir='{data_dir}'"
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # one node state for both SuperLinks (the resumed clients find their state; each run has its own
    # run tag, so the uninterrupted run beside the crashing one keeps apart), one mask secret
    node = {"data_dir": data_dir, "state_dir": tmp_path / "node-state", "test_mask_seed": 1}
    with procs.Processes() as other_ps:
        other = Simulation(tmp_path / "b", other_ps, **node)  # the uninterrupted run, then the resumed one
        straight_run = other.start_run(f"{config} output-dir='{straight}'")
        with procs.Processes() as ps:
            sim = Simulation(tmp_path / "a", ps, **node)  # the run that crashes, at the same time
            run = sim.start_run(f"{config} output-dir='{crashed}'")
            procs.wait_for(
                lambda: (crashed / "latest" / "history.json").is_file() and len(rounds_of(crashed)) >= 2,
                timeout=RUN_TIMEOUT,
                desc="two rounds done",
                procs=[run],
            )
            ps.snapshot()
            server = [p for p in procs.descendants(sim.link.pid) if b"flwr-simulation" in _cmdline(p)]
            assert server, "no ServerApp process (flwr-simulation) found"
            for pid in server:
                os.kill(pid, signal.SIGKILL)  # the server dies mid-run, without any chance to clean up
        procs.assert_gone(ps.pids)  # its SuperLink, nodes and Ray are gone too
        killed_at = load_checkpoint(crashed / "latest")["round"]
        assert 2 <= killed_at < rounds

        run = other.run(f"{config} output-dir='{crashed}' resume=true")  # on the other SuperLink
        assert run["status"] == "finished:completed", other.logs_tail()
        assert other.wait(straight_run)["status"] == "finished:completed", other.logs_tail()
    procs.assert_gone(other_ps.pids)

    a, b = load_checkpoint(straight / "latest"), load_checkpoint(crashed / "latest")
    assert a["round"] == b["round"] == rounds
    assert torch.equal(a["scores"], b["scores"]), "resumed run diverged from the uninterrupted one"
    assert [r["round"] for r in rounds_of(crashed)] == list(range(1, rounds + 1))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _dp_config(dp: str, out: Path, data_dir: Path) -> str:
    """A 3-round run under ``dp`` with epsilon 5 (on 2 nodes)."""
    return (
        f"num-server-rounds=3 eval-every=3 {TINY} objective='feature-matching' dp='{dp}' "
        f"dp-epsilon=5.0 output-dir='{out}' data-dir='{data_dir}'"
    )


def _dp_firsts(sim: Simulation, run: dict, dp: str, out: Path) -> list[float]:
    """The run of ``_dp_config`` completed on 2 nodes; each round's smallest epsilon spent."""
    assert run["status"] == "finished:completed", sim.logs_tail()
    per_round = [sorted(r["dp_epsilon_per_client"].values()) for r in rounds_of(out)]
    assert all(len(eps) == 2 for eps in per_round)
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert (
        summary["dp"] == dp
        and summary["dp_epsilon_per_client"] == rounds_of(out)[-1]["dp_epsilon_per_client"]
    )
    return [eps[0] for eps in per_round]


def test_statistics_spend_epsilon_once(plain_simulation: Simulation, plain_runs: dict) -> None:
    """statistics: the whole epsilon spent in the first round, then constant."""
    proc, out = plain_runs["statistics"]
    firsts = _dp_firsts(plain_simulation, plain_simulation.wait(proc), "statistics", out)
    assert firsts[0] == firsts[1] == firsts[2] == pytest.approx(5.0, rel=1e-3)


def test_theta_spends_per_round_and_a_second_run_cannot_spend_past_the_nodes_budget(
    data_dir: Path, tmp_path: Path
) -> None:
    """theta: epsilon grows with every round released, to the whole 5 by the last round. Then a
    second run on the same nodes (another seed, another run tag), asking for 5 again: the nodes'
    budget of 6 let the first through; in the second every client refuses with one clear error
    per round, which the server records, and the run, having learned nothing, ends failed with the
    nodes' reason (and how a simulation starts afresh) in its status line."""
    out = [tmp_path / "out-1", tmp_path / "out-2"]
    with procs.Processes() as ps:
        sim = Simulation(tmp_path, ps, data_dir=data_dir, node_config="dp-budget=6.0")
        firsts = _dp_firsts(sim, sim.run(_dp_config("theta", out[0], data_dir), nodes=2), "theta", out[0])
        second = f"num-server-rounds=2 eval-every=2 {TINY} dp='theta' dp-epsilon=5.0 seed=31"
        run = sim.run(f"{second} output-dir='{out[1]}'", nodes=2)
        assert run["status"] == "finished:failed", sim.logs_tail()
        assert "no round applied" in run["status-details"], run
        assert "node privacy budget spent" in run["status-details"] and "state-dir" in run["status-details"]
    procs.assert_gone(ps.pids)
    assert firsts[0] < firsts[1] < firsts[2] <= 5.0 * (1 + 1e-6)  # the whole budget by the last round
    assert firsts[2] == pytest.approx(5.0, rel=1e-3)
    first = rounds_of(out[0])
    assert all(r["clients"] == 2 and not r["skipped"] for r in first)
    assert all(r["loss"] is None and "label_histograms" not in r for r in first)  # only the mask leaves
    for r in rounds_of(out[1]):
        assert r["clients"] == 0 and r["skipped"] and len(r["dropped"]) == 2, r
        assert all("node privacy budget" in d and "dp-budget" in d for d in r["dropped"]), r["dropped"]


def test_dense_fedavg_baseline_runs_the_same_generator(
    plain_simulation: Simulation, plain_runs: dict
) -> None:
    sim, (proc, out) = plain_simulation, plain_runs["dense"]
    run = sim.wait(proc)
    assert run["status"] == "finished:completed", sim.logs_tail()
    for r in rounds_of(out):
        assert r["clients"] == 2 and r["uplink_bits_per_weight"] == 32.0 and np.isfinite(r["loss"]), r
        assert "mada_lambda" not in r  # a PRISM record field
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["method"] == "dense" and summary["density"] == 1.0
    assert summary["model_bytes"] >= summary["dense_float32_bytes"]
    assert torch.isfinite(torch.load(out / "latest" / "model-dense.pt")).all()
