"""The ClientApp process: runs tasks of a SuperNode as ``flwr-clientapp`` does, the app bundle checked first.

Per task (``serve_task``): pull the message, context, run and FAB (Runtime API); refuse a FAB the
node does not trust (``pinning``, an ``INVALID_FAB`` error reply with one line); install and load
the app once per process; run it; push the reply and the task's status. Two ways to run this file,
always by path with ``-P`` so that nothing of this package is imported and the app's own modules
(its copy of prism_flwr included) come from the FAB, as in Flower's ``flwr-clientapp``:
``worker.py warm SETTINGS`` (a process of the warm executor, ``executor.Worker``: one JSON job per
line on stdin) and ``worker.py once FLWR-CLIENTAPP-ARGS`` (one task, Flower's command line: the
``flwr-clientapp`` that ``prism-flwr clientapp`` and ``prism-flwr supernode`` put in its place).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def _sibling(name: str):
    """``name``.py beside this file as a private module (run by path, the package stays unimported)."""
    spec = importlib.util.spec_from_file_location(
        f"_prism_clientapp_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __package__:  # imported as prism_flwr.deployment.worker (tests)
    from prism_flwr.deployment import pinning, runtime_api
else:  # run by path: the version check of runtime_api runs before the internals below
    pinning, runtime_api = _sibling("pinning"), _sibling("runtime_api")

from flwr.app import Message  # noqa: E402
from flwr.app.error import Error  # noqa: E402
from flwr.cli.install import install_from_fab  # noqa: E402
from flwr.clientapp.client_app import ClientApp, LoadClientAppError  # noqa: E402
from flwr.clientapp.utils import get_load_client_app_fn  # noqa: E402
from flwr.common.constant import ErrorCode, SubStatus  # noqa: E402
from flwr.supercore.heartbeat import HeartbeatSender  # noqa: E402
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output  # noqa: E402

Endpoint, log = runtime_api.Endpoint, runtime_api.log


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

    def get(self, run, fab, node_config) -> ClientApp:
        """The app of ``fab``, once the node's ``trusted-apps`` (``node_config``) accept its bytes."""
        pinning.check_bundle(node_config, fab.content, fab.hash_str, run.fab_id, run.fab_version)
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
            "[prism-flwr clientapp] ClientApp of %s (FAB %s) loaded in process %d",
            run.fab_id,
            fab.hash_str[:12],
            os.getpid(),
        )
        return self.app


def error_reply_fields(ex: BaseException) -> tuple[int, str]:
    """Error code and reason as ``run_clientapp`` writes them; an untrusted FAB: INVALID_FAB, the line."""
    if isinstance(ex, pinning.AppNotTrusted):
        return ErrorCode.INVALID_FAB, str(ex)
    if isinstance(ex, LoadClientAppError):
        reason = "An exception was raised when attempting to load `ClientApp`"
        return ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason
    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"


STAGES = ("start", "pull", "load", "app")


def serve_task(endpoint: Endpoint, token: str, task_id: int, loaded: LoadedApp) -> TaskResult:
    """Run one task with the loaded app; never raises for a failure of the app itself."""
    t0 = time.monotonic()
    marks = [("start", t0)]
    client = runtime_api.runtime_client(endpoint, token)
    heartbeat = HeartbeatSender(runtime_api.heartbeat_fn(client))
    message = context = reply = app = None
    sub_status, details, fresh = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
    pushed = False
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks.append(("pull", time.monotonic()))
        app = loaded.get(run, fab, context.node_config)
        marks.append(("load", time.monotonic()))
        reply = app(message=message, context=context)
        marks.append(("app", time.monotonic()))
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - any failure of the app becomes an error reply
        code, details = error_reply_fields(ex)
        log.error("ClientApp raised an exception", exc_info=ex)
        # the app failed to load: the next task gets a new process (a refused FAB loaded nothing)
        fresh = message is not None and app is None and not isinstance(ex, pinning.AppNotTrusted)
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


# ------------------------------------------------------------------------------ processes
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


def release_heap() -> None:
    """Hand the C heap's free pages back to the system between tasks (glibc's ``malloc_trim``;
    elsewhere nothing): a warm process otherwise keeps each message's high-water mark resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        release_heap()
        results.write(json.dumps(asdict(result)) + "\n")
        if result.fresh_process_next:
            return 0
    return 0


def once_main(argv: list[str]) -> int:
    """``flwr-clientapp ARGS``: one task, the FAB checked first (exit 0 when the app completed)."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    args = _parse_args_run_flwr_clientapp().parse_args(argv)
    if args.runtime_dependency_install:
        log.warning(
            "[prism-flwr clientapp] no runtime dependency installation: the node's environment runs the app"
        )
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid)
    exit_on_sigterm()
    endpoint = Endpoint(args.runtime_api_address, args.insecure, args.root_certificates)
    result = serve_task(endpoint, try_obtain_flwr_app_token(args), 0, LoadedApp())
    return 0 if result.sub_status == SubStatus.COMPLETED else 1


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit(worker_main(json.loads(rest[0])) if mode == "warm" else once_main(rest))
