"""Warm ClientApp executor for Flower 1.42: one long-lived process per SuperNode serves every message.

Flower starts a fresh ``flwr-clientapp`` per message. With ``flower-supernode --isolation process``
the SuperNode waits for an external executor instead: here a supervisor (``serve``) acquires its
ClientApp tasks and hands each task's token to one worker process (this file run as a script),
which keeps the FAB installed, the app imported and its module state between messages, and per
task does what ``flwr.supernode.runtime.run_clientapp`` does (with that module's pull/push
functions). ``supernode_main`` runs Flower's SuperNode with its 3 s idle wait capped. The only
module of the package that imports Flower internals (pinned: 1.42.x); see docs/deployment.md 3.11.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prism_flwr.deployment.flower_pin import (
    UnsupportedFlowerVersion,
    installed_flower_version,
    require_flower,
)


def check_flower_version(version: str | None = None) -> str:
    """Return ``version`` (default: the installed Flower's) or refuse it with a clear reason."""
    version = installed_flower_version() if version is None else version
    instead = "Run the SuperNode without `--isolation process` (Flower's own executor)"
    return require_flower("the warm ClientApp executor", instead, version)


check_flower_version()  # before the internals below: a clear refusal instead of an ImportError

import httpx  # noqa: E402
from flwr.app import Message  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.cli.install import install_from_fab  # noqa: E402
from flwr.clientapp.client_app import ClientApp, LoadClientAppError  # noqa: E402
from flwr.clientapp.utils import get_load_client_app_fn  # noqa: E402
from flwr.common.constant import ErrorCode, SubStatus  # noqa: E402
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # noqa: E402
from flwr.proto.task_pb2 import Task  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.heartbeat import HeartbeatSender  # noqa: E402
from flwr.supercore.interceptors import (  # noqa: E402
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output  # noqa: E402

log = logging.getLogger("flwr")  # Flower's logger: same console format as the SuperNode's
RETRY_STATUS = (502, 503, 504)
RETRY_SECONDS = 60.0  # a worker's call gives up after this long without an answer (the task then fails)


# ------------------------------------------------------------------------------ Runtime API client
@dataclass(frozen=True)
class Endpoint:
    """Where the SuperNode's Runtime API is and how to reach it (what ``flower-superexec`` takes)."""

    address: str
    insecure: bool = False
    root_certificates: str | None = None  # a PEM file; None with TLS: the system's CAs
    auth_secret_file: str | None = None  # SuperExec auth (HMAC on AcquireTask), supervisor only


class _Retry:
    """Retry transport errors and 502/503/504 with backoff for a bounded time.

    Flower's own invoker retries forever and, on a 401, sends SIGINT to its process: right for a
    process per task, wrong for a process that must outlive a task's expired token."""

    def __init__(self, max_seconds: float = RETRY_SECONDS) -> None:
        self.max_seconds = max_seconds

    def invoke(self, send):
        start, delay = time.monotonic(), 0.1
        while True:
            try:
                return send()
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                status = err.response.status_code if isinstance(err, httpx.HTTPStatusError) else None
                retryable = status is None or status in RETRY_STATUS
                if not retryable or time.monotonic() - start + delay > self.max_seconds:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)


def runtime_client(
    endpoint: Endpoint,
    token: str | None = None,
    component: str = "flwr-clientapp",
    max_seconds: float = RETRY_SECONDS,
) -> RuntimeHttpClient:
    """A Runtime API client as ``run_clientapp`` builds one (with ``token``) or SuperExec (without)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if endpoint.auth_secret_file:
        secret = Path(endpoint.auth_secret_file).read_bytes()
        protected = {"/flwr.proto.Runtime/AcquireTask"}  # what flower-superexec signs
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=protected))
    return RuntimeHttpClient.from_server_address(
        server_address=endpoint.address,
        insecure=endpoint.insecure,
        root_certificates=None if endpoint.insecure else endpoint.root_certificates,
        interceptors=interceptors,
        retry_invoker=_Retry(max_seconds),
    )


def heartbeat_fn(client: RuntimeHttpClient):
    """Flower's task heartbeat, except that a refused beat is logged instead of ending the process."""
    request = SendTaskHeartbeatRequest()
    refused = threading.Event()

    def beat() -> bool:
        try:
            ok = client.SendTaskHeartbeat(request).success
        except httpx.TransportError:
            return False  # retried by HeartbeatSender
        except httpx.HTTPStatusError as err:
            ok = False
            log.warning("task heartbeat failed: HTTP %s", err.response.status_code)
        if not ok and not refused.is_set():
            refused.set()
            log.warning("the SuperNode no longer accepts this task's heartbeat (task expired or stopped)")
        return True

    return beat


# ------------------------------------------------------------------------------ worker: one task
@dataclass
class TaskResult:
    """What a worker tells the supervisor after a task."""

    task_id: int
    sub_status: str
    details: str
    pid: int
    seconds: float
    phases: dict[str, float]  # seconds of pull (inputs), load (FAB, app), app (handler), push (reply, status)
    reply_pushed: bool
    fresh_process_next: bool  # loading the app failed: the next task gets a new process (no half-imports)


class LoadedApp:
    """The one ClientApp this worker serves: its FAB installed and its module imported once."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None
        self.app: ClientApp | None = None

    def get(self, run, fab) -> ClientApp:
        if self.app is not None:
            if fab.hash_str != self.fab_hash:
                raise LoadClientAppError(
                    f"this process serves FAB {self.fab_hash[:12]}, not {fab.hash_str[:12]}"
                )
            return self.app
        install_from_fab(fab.content, skip_prompt=True)  # no-op when $FLWR_HOME/apps already has it
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash = fab.hash_str
        log.info(
            "[warm executor] ClientApp of %s (FAB %s) loaded in process %d",
            run.fab_id,
            fab.hash_str[:12],
            os.getpid(),
        )
        return self.app


def error_reply_fields(ex: BaseException) -> tuple[int, str]:
    """Error code and reason exactly as ``run_clientapp`` writes them."""
    if isinstance(ex, LoadClientAppError):
        reason = "An exception was raised when attempting to load `ClientApp`"
        return ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason
    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"


STAGES = ("start", "pull", "load", "app")


def serve_task(endpoint: Endpoint, token: str, task_id: int, loaded: LoadedApp) -> TaskResult:
    """Run one task with the loaded app; never raises for a failure of the app itself."""
    t0 = time.monotonic()
    marks = [("start", t0)]
    client = runtime_client(endpoint, token)
    heartbeat = HeartbeatSender(heartbeat_fn(client))
    message = context = reply = app = None
    sub_status, details, fresh = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
    pushed = False
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks.append(("pull", time.monotonic()))
        app = loaded.get(run, fab)
        marks.append(("load", time.monotonic()))
        reply = app(message=message, context=context)
        marks.append(("app", time.monotonic()))
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - any failure of the app becomes an error reply
        code, details = error_reply_fields(ex)
        log.error("ClientApp raised an exception", exc_info=ex)
        fresh = message is not None and app is None  # the app failed to load: retry in a new process
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        if len(marks) < len(STAGES):  # the stage that failed ends here
            marks.append((STAGES[len(marks)], time.monotonic()))
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
                pushed = True
            except Exception as ex:  # noqa: BLE001
                log.error("Failed to push reply message", exc_info=ex)
        if heartbeat.is_running:  # before the token is revoked: no beat is refused afterwards
            heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        client.close()
        marks.append(("push", time.monotonic()))
    phases = {name: round(t - prev, 3) for (_, prev), (name, t) in zip(marks, marks[1:])}
    return TaskResult(task_id, sub_status, details, os.getpid(), marks[-1][1] - t0, phases, pushed, fresh)


# ------------------------------------------------------------------------------ worker process
def exit_on_sigterm() -> None:
    """The first SIGTERM unwinds (``finally`` blocks push a running task's status); a second one,
    as a process group's stop sends, ends the process at once instead of interrupting the unwinding."""

    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when its supervisor is gone (SIGKILL leaves no chance to tell it)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_main(settings: dict) -> int:
    """Read one JSON job per line on stdin, run it, write one JSON result per line to ``result_fd``."""
    endpoint = Endpoint(**settings["endpoint"])
    results = os.fdopen(settings["result_fd"], "w", buffering=1)
    _exit_with_parent(settings["parent_pid"])
    exit_on_sigterm()
    loaded = LoadedApp()
    for line in sys.stdin:
        job = json.loads(line)
        result = serve_task(endpoint, job["token"], job["task_id"], loaded)
        results.write(json.dumps(asdict(result)) + "\n")
        if result.fresh_process_next:
            return 0
    return 0


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
        # Run by path with -P: the worker imports nothing of this package, so the app's own modules
        # (including its copy of prism_flwr) come from the FAB, as in Flower's flwr-clientapp.
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        command = [sys.executable, *flags, str(Path(__file__).resolve()), json.dumps(settings)]
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


def serve(endpoint: Endpoint, poll_interval: float = 0.1) -> int:
    """Supervisor loop: acquire tasks, route them to the worker of their FAB, replace dead workers."""
    log.info(
        "[warm executor] serving ClientApp tasks of the SuperNode at %s (Flower %s)",
        endpoint.address,
        installed_flower_version(),
    )
    client = runtime_client(endpoint, component="SuperExec", max_seconds=float("inf"))
    worker, deaths = Worker(endpoint), 0
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


# ------------------------------------------------------------------------------ SuperNode idle poll
IDLE_POLL_SOURCE = "time.sleep(3)"  # what start_client_internal does when the SuperLink has no message


class CappedSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every sleep is capped.

    That loop sleeps 3 s after asking the SuperLink for a message and finding none, and 0.5 s
    between looks for its ClientApp's reply; each round's next message is therefore found up to
    3 s late. Capping both costs one small request to the SuperLink per ``cap`` seconds per node."""

    def __init__(self, cap: float, sleep=time.sleep) -> None:
        self.cap, self._sleep = cap, sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def shorten_supernode_poll(cap: float) -> None:
    """Cap the hard-coded waits of Flower 1.42's SuperNode loop at ``cap`` seconds (this process)."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    if IDLE_POLL_SOURCE not in inspect.getsource(loop.start_client_internal) or loop.time is not time:
        raise UnsupportedFlowerVersion(
            "the SuperNode loop of this Flower does not sleep as 1.42.0's does "
            "(or is patched already): run flower-supernode itself"
        )
    loop.time = CappedSleep(cap)


def supernode_main(argv: list[str], idle_poll: float) -> None:
    """``flower-supernode`` with ``argv``, its idle poll capped at ``idle_poll`` seconds."""
    from flwr.supernode.cli import flower_supernode

    shorten_supernode_poll(idle_poll)
    log.info(
        "[prism-flwr supernode] SuperNode waits capped at %.2f s (Flower's: 3 s idle, 0.5 s reply)", idle_poll
    )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":  # the worker process (started by Worker, never by hand)
    sys.exit(worker_main(json.loads(sys.argv[1])))
