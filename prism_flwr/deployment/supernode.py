"""``prism-flwr supernode``: Flower 1.42's SuperNode with its waits capped and the node's ClientApp check.

``CappedSleep`` caps the hard-coded sleeps of Flower's SuperNode loop. ``checked_clientapp_path``
puts a ``flwr-clientapp`` first on the PATH that the SuperNode's own SuperExec inherits: this
package's ``worker.py once``, which checks each FAB against the node's ``trusted-apps`` before
running it (Flower's SuperExec starts ``flwr-clientapp`` by name, once per message).

With ``warm`` (``prism-flwr supernode --warm``) there is no SuperExec process: the SuperNode runs
with ``--isolation process`` and a thread of its own process acquires the tasks (``executor.serve``)
for one warm worker, which checks each FAB the same way. A small device holds two processes
instead of three (Flower's SuperExec alone is about 90 MiB anonymous), and each message skips
the ClientApp's imports. Unless a ``--superexec-auth-secret-file`` is given, a fresh secret lets
only this process acquire the node's tasks.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from prism_flwr.deployment.runtime_api import UnsupportedFlowerVersion, check_flower_version, log

WORKER = Path(__file__).resolve().with_name("worker.py")


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


def clientapp_command() -> list[str]:
    """The checked ``flwr-clientapp``: this package's worker, one task, run by path (see worker.py)."""
    return [sys.executable, "-P", str(WORKER), "once"]


def checked_clientapp_path(folder: Path) -> str:
    """Write ``folder/flwr-clientapp`` (the checked one) and return a PATH with ``folder`` first."""
    script = folder / "flwr-clientapp"
    script.write_text("#!/bin/sh\nexec " + shlex.join(clientapp_command()) + ' "$@"\n')
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


class WarmOptionsRefused(ValueError):
    """``--warm`` with SuperNode arguments it cannot serve (another isolation mode)."""


def warm_argv(argv: list[str], folder: Path):
    """``argv`` for a SuperNode whose tasks this process serves, and the executor's endpoint.

    Adds ``--isolation process`` and, where ``argv`` names no SuperExec secret, a fresh one in
    ``folder`` (mode 0600). The endpoint is the SuperNode's Runtime API as ``--host``/``--port`` and
    its TLS flags say (a wildcard host is reached on loopback)."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from prism_flwr.deployment.runtime_api import Endpoint

    args = _parse_args_run_supernode().parse_args(argv)  # a bad argument exits as flower-supernode does
    named = any(a == "--isolation" or a.startswith("--isolation=") for a in argv)
    if named and args.isolation != "process":
        raise WarmOptionsRefused(
            f"--warm runs the SuperNode with --isolation process; drop --isolation {args.isolation}"
        )
    argv = list(argv) if named else [*argv, "--isolation", "process"]
    secret_file = args.superexec_auth_secret_file
    if secret_file is None:
        secret_file = str(folder / "superexec.secret")
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        argv += ["--superexec-auth-secret-file", secret_file]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    address = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    tls = bool(args.ssl_certfile)
    return argv, Endpoint(address, not tls, args.ssl_ca_certfile if tls else None, secret_file)


def serve_in_thread(endpoint, poll_interval: float) -> threading.Thread:
    """Serve the SuperNode's ClientApp tasks from a daemon thread (``executor.serve``); should it stop,
    the whole process stops (SIGTERM to itself), so a supervisor or restart policy sees the node go."""
    from prism_flwr.deployment import executor

    def run() -> None:
        try:
            executor.serve(endpoint, poll_interval, handle_sigterm=False)
            reason = "returned"
        except BaseException as err:  # noqa: BLE001 - any end of the executor ends the node
            reason = f"{type(err).__name__}: {err}"
        log.error("[prism-flwr supernode] the ClientApp executor stopped (%s): the SuperNode stops", reason)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="prism-clientapp-executor", daemon=True)
    thread.start()
    return thread


def supernode_main(argv: list[str], idle_poll: float, warm: bool = False) -> None:
    """``flower-supernode`` with ``argv``: waits capped at ``idle_poll`` s, ClientApps run checked;
    with ``warm``, by one worker process whose tasks a thread of this process acquires."""
    from flwr.supernode.cli import flower_supernode

    check_flower_version()
    folder = Path(tempfile.mkdtemp(prefix="prism-clientapp-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if warm:
        argv, endpoint = warm_argv(argv, folder)  # refused arguments change nothing in this process
    shorten_supernode_poll(idle_poll)
    if warm:
        serve_in_thread(endpoint, min(idle_poll, 0.1))
        how = f"by one warm process, its tasks acquired in this process from {endpoint.address}"
    else:
        os.environ["PATH"] = checked_clientapp_path(folder)
        how = f"through {folder / 'flwr-clientapp'}"
    log.info(
        "[prism-flwr supernode] SuperNode waits capped at %.2f s (Flower's: 3 s idle, 0.5 s reply); "
        "ClientApps run %s (the node's trusted-apps check)",
        idle_poll,
        how,
    )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
