"""``prism-flwr supernode``: Flower 1.42's SuperNode with its waits capped and the node's ClientApp check.

``CappedSleep`` caps the hard-coded sleeps of Flower's SuperNode loop. ``checked_clientapp_path``
puts a ``flwr-clientapp`` first on the PATH that the SuperNode's own SuperExec inherits: this
package's ``worker.py once``, which checks each FAB against the node's ``trusted-apps`` before
running it (Flower's SuperExec starts ``flwr-clientapp`` by name, once per message).
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import sys
import tempfile
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


def supernode_main(argv: list[str], idle_poll: float) -> None:
    """``flower-supernode`` with ``argv``: waits capped at ``idle_poll`` s, ClientApps run checked."""
    from flwr.supernode.cli import flower_supernode

    check_flower_version()
    shorten_supernode_poll(idle_poll)
    folder = Path(tempfile.mkdtemp(prefix="prism-clientapp-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["PATH"] = checked_clientapp_path(folder)
    log.info(
        "[prism-flwr supernode] SuperNode waits capped at %.2f s (Flower's: 3 s idle, 0.5 s reply); "
        "ClientApps run through %s (the node's trusted-apps check)",
        idle_poll,
        folder / "flwr-clientapp",
    )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
