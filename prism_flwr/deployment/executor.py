"""Warm ClientApp executor for Flower 1.42: one long-lived process per SuperNode serves every message.

Flower starts a fresh ``flwr-clientapp`` per message. With ``flower-supernode --isolation process``
the SuperNode waits for an external executor instead: here a supervisor (``serve``) acquires its
ClientApp tasks and hands each task's token to one worker process (``worker.py``), which keeps the
FAB installed, the app imported and its module state between messages, and checks each task's FAB
against the node's ``trusted-apps`` before running it. Flower internals: pinned to 1.42.x
(``runtime_api``); see docs/deployment.md 3.11.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from prism_flwr.deployment.runtime_api import check_flower_version

check_flower_version()  # before the internals below: a clear refusal instead of an ImportError

import httpx  # noqa: E402
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402
from flwr.proto.task_pb2 import Task  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402

from prism_flwr.deployment.runtime_api import Endpoint, installed_flower_version, log, runtime_client  # noqa: E402
from prism_flwr.deployment.worker import exit_on_sigterm, release_heap  # noqa: E402

WORKER = Path(__file__).resolve().with_name("worker.py")


# ------------------------------------------------------------------------------ supervisor
class Worker:
    """One worker process and the FAB it is bound to (None until its first task)."""

    def __init__(self, endpoint: Endpoint) -> None:
        read_fd, write_fd = os.pipe()
        settings = {
            "endpoint": asdict(endpoint) | {"auth_secret_file": None},
            "result_fd": write_fd,
            "parent_pid": os.getpid(),
        }
        # By path with -P (worker.py): nothing of this package is imported there, so the app's own
        # modules (including its copy of prism_flwr) come from the FAB, as in Flower's flwr-clientapp.
        command = [sys.executable, "-P", str(WORKER), "warm", json.dumps(settings)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self.results_fd, self._pending = read_fd, b""
        self.fab_hash: str | None = None
        log.info("[warm executor] started worker process %d", self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_line(self) -> dict | None:
        """The worker's next JSON line, or None once it has exited (or closed its end)."""
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.results_fd], [], [], 0.5)
            if ready:
                chunk = os.read(self.results_fd, 65536)
                if not chunk:
                    return None
                self._pending += chunk
            elif not self.alive():
                return None
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, token: str, task: Task) -> dict | None:
        """Hand the task to the worker and wait for its result (None: the worker died)."""
        self.fab_hash = task.fab_hash
        try:
            self.proc.stdin.write(json.dumps({"token": token, "task_id": task.task_id}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self._read_line()

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self.results_fd)


class RuntimeApiRefused(RuntimeError):
    """The SuperNode refuses this executor (authentication): retrying cannot help."""


def acquire(client: RuntimeHttpClient) -> tuple[Task, str] | None:
    """Claim the oldest pending ClientApp task of the SuperNode, or None (also after a passing error)."""
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (401, 403):
            raise RuntimeApiRefused(
                f"the Runtime API refused AcquireTask (HTTP {err.response.status_code}): "
                f"check --superexec-auth-secret-file and TLS options"
            ) from err
        log.warning("[warm executor] AcquireTask failed (HTTP %s); retrying", err.response.status_code)
        time.sleep(1.0)
        return None
    return (res.task, res.token) if res.HasField("task") and res.token else None


def _replace(worker: Worker, endpoint: Endpoint) -> Worker:
    worker.stop()
    return Worker(endpoint)


def _restart_delay(deaths: int) -> float:
    """Seconds before replacing a worker after ``deaths`` unexpected exits in a row: a worker that
    dies at start-up (a broken environment) must not make this loop spin."""
    return 0.0 if deaths <= 1 else min(30.0, 0.5 * 2**deaths)


def serve(endpoint: Endpoint, poll_interval: float = 0.1, handle_sigterm: bool = True) -> int:
    """Supervisor loop: acquire tasks, route them to the worker of their FAB, replace dead workers.

    ``handle_sigterm``: the first SIGTERM unwinds this loop (False in a thread of another program,
    which owns its signals; the worker ends with its parent process)."""
    log.info(
        "[warm executor] serving ClientApp tasks of the SuperNode at %s (Flower %s)",
        endpoint.address,
        installed_flower_version(),
    )
    client = runtime_client(endpoint, component="SuperExec", max_seconds=float("inf"))
    worker, deaths = Worker(endpoint), 0
    if handle_sigterm:
        exit_on_sigterm()
    try:
        while True:
            if not worker.alive():  # crashed, or left after a failed load: warm up the next one now
                deaths = deaths + 1 if worker.proc.returncode != 0 else 0
                log.warning(
                    "[warm executor] worker %d exited (code %s); starting a new one",
                    worker.proc.pid,
                    worker.proc.returncode,
                )
                time.sleep(_restart_delay(deaths))
                worker = _replace(worker, endpoint)
            claimed = acquire(client)
            if claimed is None:
                time.sleep(poll_interval)
                continue
            task, token = claimed
            if worker.fab_hash not in (None, task.fab_hash):  # two apps never share one interpreter
                log.info(
                    "[warm executor] task %d is another app's (FAB %s): new worker",
                    task.task_id,
                    task.fab_hash[:12],
                )
                worker = _replace(worker, endpoint)
            result = worker.run(token, task)
            if result is None:
                log.error(
                    "[warm executor] worker %d died during task %d; the SuperNode answers the message "
                    "as crashed once the task's heartbeat expires",
                    worker.proc.pid,
                    task.task_id,
                )
            else:
                deaths = 0
                release_heap()  # the message's bytes passed through this process (in --warm, the SuperNode's)
                log.info(
                    "[warm executor] task %d %s in %.2f s by process %d (%s)",
                    result["task_id"],
                    result["sub_status"],
                    result["seconds"],
                    result["pid"],
                    ", ".join(f"{k} {v:.2f} s" for k, v in result["phases"].items()),
                )
    finally:
        worker.stop()
        client.close()
    return 0
