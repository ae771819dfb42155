"""The real app on Flower's simulation engine (Ray): end to end, bad config, failures, kill + resume.

Each test starts its own simulation SuperLink on a free port with a private FLWR_HOME (so a
user's local SuperLink on port 39091 is never touched) and stops every process it started.
Tiny sizes (ngf 4, a few local steps) keep each run to tens of seconds on 2 cores.
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
from tools import procs
from tools.flowerkit import REPO, exe, flower_env, newest_run, write_connection

RUN_TIMEOUT = 300
TINY = "local-steps=3 ngf=4 eval-samples=64 min-train-nodes=2 eval-feature-metrics=false"


class Simulation:
    """A simulation SuperLink plus `flwr run` of this repository against it."""

    def __init__(
        self,
        tmp: Path,
        ps: procs.Processes,
        extra_env: dict[str, str] | None = None,
        *,
        app: Path = REPO,
        data_dir: Path | None = None,
        state_dir: Path | None = None,
        node_config: str = "",
        test_mask_seed: int | None = None,
    ) -> None:
        """The simulated nodes' own settings (data-dir, state-dir, ``node_config``) reach them as
        ``PRISM_NODE_CONFIG``; ``test_mask_seed`` makes their masks predictable (reproducible runs);
        ``app`` is the app directory to run (a test-only variant, e.g. the fault-injecting app)."""
        self.home, self.logs, self.app = tmp / "flwr-home", tmp / "logs", app
        self.logs.mkdir(parents=True, exist_ok=True)
        node = f"state-dir='{state_dir or tmp / 'node-state'}' {node_config}"
        if data_dir is not None:
            node += f" data-dir='{data_dir}'"
        seed = {} if test_mask_seed is None else {"PRISM_INSECURE_TEST_MASK_SEED": str(test_mask_seed)}
        self.env = {**flower_env(self.home), "PRISM_NODE_CONFIG": node.strip(), **seed, **(extra_env or {})}
        self.ps = ps
        port = procs.free_port()
        write_connection(self.home, "sim", f"127.0.0.1:{port}", insecure=True)
        n = len(list(self.logs.glob("superlink*.log")))
        self.link = ps.start(
            [
                exe("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp / f"state-{n}.db"),
            ],
            env=self.env,
            log_path=self.logs / f"superlink-{n}.log",
        )
        procs.wait_for_port("127.0.0.1", port, timeout=60, procs=[self.link])

    def start_run(self, run_config: str, nodes: int = 3) -> subprocess.Popen:
        n = len(list(self.logs.glob("run*.log")))
        return self.ps.start(
            [
                exe("flwr"),
                "run",
                str(self.app),
                "sim",
                "--stream",
                "--run-config",
                run_config,
                "--federation-config",
                f"num-supernodes={nodes} client-resources-num-cpus=1",
            ],
            env=self.env,
            log_path=self.logs / f"run-{n}.log",
            cwd=self.home,
        )

    def run(self, run_config: str, nodes: int = 3) -> dict:
        """Run to the end; return the run's record from `flwr ls`."""
        proc = self.start_run(run_config, nodes)
        proc.wait(timeout=RUN_TIMEOUT)
        self.ps.snapshot()
        return newest_run(self.env, "sim")

    def logs_tail(self) -> str:
        return "\n".join(procs.tail(p, 30) for p in sorted(self.logs.iterdir()))


def rounds_of(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "latest" / "history.json").read_text()) if r["round"] >= 1]


def test_simulation_end_to_end_with_failing_and_corrupt_clients(data_dir: Path, tmp_path: Path) -> None:
    """4 clients, one raising every round and one uploading a corrupt mask: the run completes on
    the other two, history shows both dropped with their reasons, the model loads and samples."""
    out = tmp_path / "out"
    with procs.Processes() as ps:
        sim = Simulation(
            tmp_path,
            ps,
            extra_env={FAULT_ENV: "raise=1 corrupt=2"},
            data_dir=data_dir,
            app=fault_app_dir(tmp_path / "app"),
        )  # the app behind a fault-injecting mod
        run = sim.run(
            f"num-server-rounds=2 eval-every=1 aggregation='mada' {TINY} output-dir='{out}' data-dir='{data_dir}'",
            nodes=4,
        )
        assert run["status"] == "finished:completed", sim.logs_tail()
    procs.assert_gone(ps.pids)

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


BAD_CONFIGS = [
    (
        "dataset='foo'",
        "run-config key 'dataset' = 'foo': Input should be 'mnist', 'fmnist', 'cifar10' or 'celeba'",
    ),
    ("ngf=-1", "run-config key 'ngf' = -1: Input should be greater than or equal to 1"),
    ("lr='fast'", "run-config key 'lr' = 'fast': Input should be a valid number"),
]


def test_bad_run_config_fails_before_training(data_dir: Path, tmp_path: Path) -> None:
    """A choice, a range and a type error: each run ends failed with one line, nothing trained."""
    with procs.Processes() as ps:
        sim = Simulation(tmp_path, ps, data_dir=data_dir)
        for i, (bad, line) in enumerate(BAD_CONFIGS):
            out = tmp_path / f"out-{i}"
            run = sim.run(f"{bad} output-dir='{out}' data-dir='{data_dir}'", nodes=2)
            status = subprocess.run(
                [exe("prism-flwr"), "last-run", "sim"],
                env=sim.env,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=sim.home,
            )
            assert run["status"] == "finished:failed" and line in run["status-details"], run
            assert status.returncode == 1 and line in status.stdout
            assert not out.exists()  # nothing trained, nothing written
    procs.assert_gone(ps.pids)


def test_kill_and_resume_matches_an_uninterrupted_run(data_dir: Path, tmp_path: Path) -> None:
    rounds = 4
    config = f"num-server-rounds={rounds} {TINY} eval-every=2 data-dir='{data_dir}'"
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # one node state for all three (the resumed clients find their state), one mask secret for both runs
    node = {"data_dir": data_dir, "state_dir": tmp_path / "node-state", "test_mask_seed": 1}
    with procs.Processes() as ps:
        sim = Simulation(tmp_path / "a", ps, **node)
        assert sim.run(f"{config} output-dir='{straight}'")["status"] == "finished:completed", sim.logs_tail()
        ps.stop_all()

        sim = Simulation(tmp_path / "b", ps, **node)
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
        ps.stop_all()
        killed_at = load_checkpoint(crashed / "latest")["round"]
        assert 2 <= killed_at < rounds

        sim = Simulation(tmp_path / "c", ps, **node)
        run = sim.run(f"{config} output-dir='{crashed}' resume=true")
        assert run["status"] == "finished:completed", sim.logs_tail()
    procs.assert_gone(ps.pids)

    a, b = load_checkpoint(straight / "latest"), load_checkpoint(crashed / "latest")
    assert a["round"] == b["round"] == rounds
    assert torch.equal(a["scores"], b["scores"]), "resumed run diverged from the uninterrupted one"
    assert [r["round"] for r in rounds_of(crashed)] == list(range(1, rounds + 1))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("dp", ["theta", "statistics"])
def test_dp_modes_account_epsilon_per_client(data_dir: Path, tmp_path: Path, dp: str) -> None:
    """theta: epsilon grows with every round released; statistics: spent once, then constant."""
    out = tmp_path / "out"
    with procs.Processes() as ps:
        sim = Simulation(tmp_path, ps, data_dir=data_dir)
        run = sim.run(
            f"num-server-rounds=3 eval-every=3 {TINY} objective='feature-matching' dp='{dp}' "
            f"dp-epsilon=5.0 output-dir='{out}' data-dir='{data_dir}'",
            nodes=2,
        )
        assert run["status"] == "finished:completed", sim.logs_tail()
    procs.assert_gone(ps.pids)
    per_round = [sorted(r["dp_epsilon_per_client"].values()) for r in rounds_of(out)]
    assert all(len(eps) == 2 for eps in per_round)
    firsts = [eps[0] for eps in per_round]
    if dp == "theta":
        assert firsts[0] < firsts[1] < firsts[2] <= 5.0 * (1 + 1e-6)  # the whole budget by the last round
        assert firsts[2] == pytest.approx(5.0, rel=1e-3)
        assert all(
            r["loss"] is None and "label_histograms" not in r for r in rounds_of(out)
        )  # only the mask leaves
    else:
        assert firsts[0] == firsts[1] == firsts[2] == pytest.approx(5.0, rel=1e-3)
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert (
        summary["dp"] == dp
        and summary["dp_epsilon_per_client"] == rounds_of(out)[-1]["dp_epsilon_per_client"]
    )


def test_a_second_run_cannot_spend_past_the_nodes_budget(data_dir: Path, tmp_path: Path) -> None:
    """Two runs on the same nodes, each asking for epsilon 5 (another seed, another run tag): the
    nodes' budget of 6 lets the first through; in the second every client refuses with one clear
    error per round, which the server records, and the run ends normally with those rounds skipped."""
    out = [tmp_path / "out-1", tmp_path / "out-2"]
    config = f"num-server-rounds=2 eval-every=2 {TINY} dp='theta' dp-epsilon=5.0"
    with procs.Processes() as ps:
        sim = Simulation(tmp_path, ps, data_dir=data_dir, node_config="dp-budget=6.0")
        for i, seed in enumerate((30, 31)):
            run = sim.run(f"{config} seed={seed} output-dir='{out[i]}'", nodes=2)
            assert run["status"] == "finished:completed", sim.logs_tail()
    procs.assert_gone(ps.pids)
    assert all(r["clients"] == 2 and not r["skipped"] for r in rounds_of(out[0]))
    for r in rounds_of(out[1]):
        assert r["clients"] == 0 and r["skipped"] and len(r["dropped"]) == 2, r
        assert all("node privacy budget" in d and "dp-budget" in d for d in r["dropped"]), r["dropped"]


def test_dense_fedavg_baseline_runs_the_same_generator(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with procs.Processes() as ps:
        sim = Simulation(tmp_path, ps, data_dir=data_dir)
        run = sim.run(
            f"num-server-rounds=2 eval-every=2 {TINY} method='dense' output-dir='{out}' data-dir='{data_dir}'",
            nodes=2,
        )
        assert run["status"] == "finished:completed", sim.logs_tail()
    procs.assert_gone(ps.pids)
    for r in rounds_of(out):
        assert r["clients"] == 2 and r["uplink_bits_per_weight"] == 32.0 and np.isfinite(r["loss"]), r
        assert "mada_lambda" not in r  # a PRISM record field
    summary = json.loads((out / "latest" / "summary.json").read_text())
    assert summary["method"] == "dense" and summary["density"] == 1.0
    assert summary["model_bytes"] >= summary["dense_float32_bytes"]
    assert torch.isfinite(torch.load(out / "latest" / "model-dense.pt")).all()
