"""Threads that do not fight: torch's intra-op thread count and OpenMP's wait policy, set on purpose.

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already names one.
libgomp reads it once, when torch loads, so it only takes effect when this module is imported
before torch (``prism_flwr/__init__.py``, ``benchmarks/`` and ``experiments/`` do); child processes
inherit it. An idle OpenMP worker then sleeps instead of spinning, which on a busy machine made a
2-thread step 5x slower than a 1-thread one. ``configure_threads`` sets the thread count: by
default the CPUs this process was given (``OMP_NUM_THREADS``, which Ray sets to an actor's CPU
count: 1 for ``client-resources-num-cpus = 1``; else the process's CPU affinity, capped by its
cgroup's CPU quota: ``docker run --cpus 1`` or systemd's ``CPUQuota=100%`` give 1). The thread
count is part of the arithmetic: NHWC and bf16 convolutions sum in another order with another
count, so runs compare bit for bit only at equal counts.
"""

from __future__ import annotations

import os
from pathlib import Path

WAIT_POLICY = "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)

_chosen: int | None = None  # an explicit choice made in this process


def threads_for_process() -> int:
    """``OMP_NUM_THREADS`` when set (Ray: the actor's CPUs), else the CPUs this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value.split(",")[0]))
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}") from None
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call (macOS, Windows)
        cpus = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """``mount`` joined with ``path`` and each of its parents, then ``mount`` itself (in a container
    the mount is the container's own cgroup while /proc names the host's path)."""
    parts = [part for part in path.strip().split("/") if part]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)] + [mount]


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs this process's cgroup may use (the smallest quota on its path: cgroup v2 ``cpu.max``,
    v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None without a quota or where unreadable."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            for folder in _cgroup_dirs(root, path):
                try:
                    quota, period = (folder / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                if quota != "max" and int(period) > 0:
                    limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in (root / "cpu", root / "cpu,cpuacct"):
                for folder in _cgroup_dirs(mount, path):
                    try:
                        quota = int((folder / "cpu.cfs_quota_us").read_text())
                        period = int((folder / "cpu.cfs_period_us").read_text())
                    except (OSError, ValueError):
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
    return min(limits) if limits else None


def configure_threads(n: int | None = None, *, fallback: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` and return it.

    ``n=None``: an earlier explicit choice made in this process (an experiment that asked for 1
    thread keeps it inside the runner it calls), else ``OMP_NUM_THREADS``, else ``fallback``, else
    the process's CPUs (``threads_for_process``).
    """
    global _chosen
    import torch  # here, not at module level: importing this module must not load torch

    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be at least 1, got {n}")
        _chosen = n
    if _chosen is not None:
        threads = _chosen
    elif fallback is not None and not os.environ.get("OMP_NUM_THREADS", "").strip():
        threads = fallback
    else:
        threads = threads_for_process()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
