"""What a dataset download needs around torchvision's: one downloader per (data directory,
dataset) across processes (a file lock), a socket timeout, and telling "no network" from a bad file.
"""

from __future__ import annotations

import fcntl
import socket
import urllib.error
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def download_lock(root: Path, name: str):
    """One downloader per (data directory, dataset) across processes (simulated clients, server)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def no_network(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) is a failure to reach the server, not a bad file."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(
            err, (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, socket.gaierror)
        ):
            return True
        if isinstance(err, RuntimeError) and ("urlopen error" in str(err) or "timed out" in str(err)):
            return True  # MNIST's loop over mirrors re-raises their URLErrors as one RuntimeError
        err = err.__cause__ or err.__context__
    return False
