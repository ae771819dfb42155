"""Background processes for tests: start with a log file, wait for readiness, stop everything.

    from tools import procs

    port = procs.free_port()
    with procs.Processes() as ps:
        link = ps.start(["flower-superlink", "--insecure", "--port", str(port)], log_path=tmp / "link.log")
        procs.wait_for_port("127.0.0.1", port, timeout=60, procs=[link])
        ...
    procs.assert_gone(ps.pids)   # every process seen, its children included, has exited

``start`` runs the command in a new session (its PID is also its process-group ID) with stdout and
stderr in ``log_path`` and a marker variable in its environment. ``stop`` ends the whole tree:
the process group, every descendant (Flower starts helpers such as ``flower-superexec`` in sessions
of their own) and every process still carrying the marker (descendants whose parent died before
them, re-parented to init). SIGTERM first, SIGKILL after ``grace`` seconds. Linux only (/proc).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MARKER = "PRISM_TEST_PROCS_TAG"


# ----------------------------------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports (all sockets are held open until every port is picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- /proc
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return rest[0], int(rest[1])


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` in the process tree (children first found first)."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        stat = _stat(p)
        if stat is not None:
            children.setdefault(stat[1], []).append(p)
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return [p for p in found if is_alive(p)]


def tagged(tag: str) -> list[int]:
    """Living processes whose environment carries ``MARKER=tag`` (inherited by all descendants)."""
    needle = f"{MARKER}={tag}".encode() + b"\0"
    found = []
    for p in _all_pids():
        try:
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if needle in env and is_alive(p):
            found.append(p)
    return found


def group_members(pgid: int) -> list[int]:
    found = []
    for p in _all_pids():
        try:
            if os.getpgid(p) == pgid and is_alive(p):
                found.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return found


# ------------------------------------------------------------------------------------ start/stop
def start(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    tag: str | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session, stdout+stderr to ``log_path`` (or discarded).

    ``env`` replaces the environment (default: this process's). The returned Popen has
    ``.log_path`` (Path or None) and ``.tag`` (the marker value its whole tree inherits).
    """
    full_env = dict(os.environ if env is None else env)
    tag = tag or uuid.uuid4().hex
    full_env[MARKER] = tag
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        popen = subprocess.Popen(
            list(map(str, cmd)),
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # the child holds its own descriptor
    popen.log_path = Path(log_path) if log_path is not None else None  # type: ignore[attr-defined]
    popen.tag = tag  # type: ignore[attr-defined]
    return popen


def tree(popen: subprocess.Popen) -> list[int]:
    """The process, its group, its descendants and every process carrying its marker."""
    pids = {popen.pid} if is_alive(popen.pid) else set()
    pids.update(descendants(popen.pid))
    pids.update(group_members(popen.pid))
    if getattr(popen, "tag", None):
        pids.update(tagged(popen.tag))
    return sorted(pids)


def _signal(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(popen: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """End ``popen`` and everything it started; return every PID that was signalled.

    SIGTERM to the process group and to each process of ``tree``; after ``grace`` seconds SIGKILL
    to whatever is left (looked up again, so helpers started meanwhile are caught too). Always
    reaps ``popen``. Raises RuntimeError if something survives SIGKILL.
    """
    seen = set(tree(popen))
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(seen, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        popen.poll()  # reap the direct child so it does not linger as a zombie
        left = set(tree(popen))
        seen |= left
        if not left:
            break
        time.sleep(0.1)
    else:
        left = set(tree(popen))
        seen |= left
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(left, signal.SIGKILL)
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        wait_for(
            lambda: not tree(popen),
            timeout=5,
            interval=0.05,
            desc="processes to die after SIGKILL",
            raise_on_timeout=False,
        )
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    # Orphans (reparented away from the tree) can take a moment to die after the signal.
    wait_for(
        lambda: not [p for p in seen if is_alive(p)],
        timeout=10,
        interval=0.1,
        desc="signalled processes to exit",
        raise_on_timeout=False,
    )
    survivors = [p for p in seen if is_alive(p)]
    if survivors:
        raise RuntimeError(f"processes survived SIGKILL: {survivors}")
    return sorted(seen)


def assert_gone(pids: Iterable[int]) -> None:
    """Fail (AssertionError) if any of ``pids`` still runs."""
    alive = [p for p in pids if is_alive(p)]
    if alive:
        details = []
        for p in alive:
            try:
                cmdline = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                details.append(f"{p}: {cmdline}")
            except OSError:
                details.append(str(p))
        raise AssertionError("processes still running: " + "; ".join(details))


# ------------------------------------------------------------------------------------- waiting
def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.2,
    desc: str = "condition",
    procs: Sequence[subprocess.Popen] = (),
    raise_on_timeout: bool = True,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass.

    If one of ``procs`` exits meanwhile, fail at once with the tail of its log: a server that
    crashed at start-up then reports its error instead of a timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"while waiting for {desc}: process {p.pid} ({_cmd(p)}) exited with "
                    f"{p.returncode}\n{tail(getattr(p, 'log_path', None))}"
                )
        if time.monotonic() >= deadline:
            if not raise_on_timeout:
                return value
            logs = "\n".join(tail(getattr(p, "log_path", None)) for p in procs)
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {desc}\n{logs}")
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float = 60, procs: Sequence[subprocess.Popen] = ()) -> None:
    wait_for(lambda: port_open(host, port), timeout, desc=f"{host}:{port} to accept connections", procs=procs)


def wait_for_log(popen: subprocess.Popen, pattern: str, timeout: float = 60) -> re.Match:
    """Wait until ``popen``'s log file matches the regular expression ``pattern``; return the match."""
    path = popen.log_path  # type: ignore[attr-defined]
    regex = re.compile(pattern)

    def search() -> re.Match | None:
        try:
            return regex.search(path.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    return wait_for(search, timeout, desc=f"/{pattern}/ in {path}", procs=[popen])


def tail(path: str | os.PathLike | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (ANSI colours stripped), for error messages."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return f"--- {path}: (no file)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return f"--- last {lines} lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])


def _cmd(popen: subprocess.Popen) -> str:
    args = popen.args if isinstance(popen.args, (list, tuple)) else [popen.args]
    return " ".join(map(str, args))[:200]


# ------------------------------------------------------------------------------------ registry
class Processes:
    """Starts processes and stops all of them (newest first) on exit, even after an error.

    ``pids`` collects every PID ever seen in any tree (the started processes and their helpers),
    so a test can ``assert_gone(ps.pids)`` after the ``with`` block.
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.started: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def start(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        popen = start(cmd, env=env, log_path=log_path, cwd=cwd)
        self.started.append(popen)
        self.pids.add(popen.pid)
        return popen

    def snapshot(self) -> set[int]:
        """Record the PIDs now running in every tree (call it while the work is in progress)."""
        for popen in self.started:
            self.pids.update(tree(popen))
        return self.pids

    def stop_all(self) -> None:
        errors = []
        for popen in reversed(self.started):
            try:
                self.pids.update(stop(popen, self.grace))
            except Exception as err:  # keep stopping the others
                errors.append(err)
        self.started.clear()
        # Processes once seen in our trees but orphaned since (e.g. Ray's agents after their raylet
        # was SIGKILLed with the ServerApp) are no longer in any tree: end them by their PIDs.
        _signal([p for p in self.pids if is_alive(p)], signal.SIGKILL)
        wait_for(
            lambda: not [p for p in self.pids if is_alive(p)],
            timeout=10,
            interval=0.1,
            desc="orphaned processes to exit",
            raise_on_timeout=False,
        )
        if errors:
            raise errors[0]

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
