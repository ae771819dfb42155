"""A simulation SuperLink (Flower's Ray engine) on a free loopback port with a private FLWR_HOME,
and `flwr run` of an app against it: the tests' one way to run the real app through Flower.

A user's local SuperLink on port 39091 is never touched; every process started is stopped by the
``procs.Processes`` the caller gives. Several runs may share one SuperLink when they need the same
node settings (they reach the simulated nodes through the SuperLink's environment), one after the
other or at the same time (``start_run`` each, then ``wait`` each: every run has its own Ray
cluster, its own run tag and so its own client state).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tools import procs
from tools.flowerkit import REPO, exe, flower_env, run_record, start_superlink, write_connection

RUN_TIMEOUT = 300
TINY = "local-steps=3 ngf=4 eval-samples=64 min-train-nodes=2 eval-feature-metrics=false"
# Flower's simulation settings besides the node count: Ray given one CPU, so one actor (one worker
# process importing torch and the app) serves every simulated node in turn, one thread each. Two
# actors, for the tests' few local steps, cost more CPU than they save (a 3-node run: 23-28
# CPU-seconds of its process tree against 19 with one, on a busy 2-core machine, 2026-12-07).
FEDERATION = "client-resources-num-cpus=1 init-args-num-cpus=1"


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
        engine = ("--simulation", "--isolation", "subprocess", "--database", str(tmp / f"state-{n}.db"))
        self.link = start_superlink(ps, port, self.env, self.logs / f"superlink-{n}.log", extra=engine)

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
                f"num-supernodes={nodes} {FEDERATION}",
            ],
            env=self.env,
            log_path=self.logs / f"run-{n}.log",
            cwd=self.home,
        )

    def run(self, run_config: str, nodes: int = 3) -> dict:
        """Run to the end; return the run's record from `flwr ls`."""
        return self.wait(self.start_run(run_config, nodes))

    def submitted(self, proc: subprocess.Popen) -> str:
        """The run id of the `flwr run` ``proc``, once the SuperLink has accepted the run."""
        found = procs.wait_for_log(proc, r"Successfully started run (\d+)", timeout=RUN_TIMEOUT)
        return found.group(1)

    def wait(self, proc: subprocess.Popen) -> dict:
        """Wait for the `flwr run` ``proc`` to end; return its run's record from `flwr ls`."""
        run_id = self.submitted(proc)
        proc.wait(timeout=RUN_TIMEOUT)
        self.ps.snapshot()
        return run_record(self.env, "sim", run_id)

    def logs_tail(self) -> str:
        return "\n".join(procs.tail(p, 30) for p in sorted(self.logs.iterdir()))


def rounds_of(out: Path) -> list[dict]:
    """The trained rounds' records of the newest run written under ``out``."""
    return [r for r in json.loads((out / "latest" / "history.json").read_text()) if r["round"] >= 1]
