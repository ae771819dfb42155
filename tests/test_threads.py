"""Threads set on purpose: the count from the process's CPUs (Ray's OMP_NUM_THREADS), the passive
OpenMP wait policy set before torch loads, an explicit choice kept by later default calls."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_flwr import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    before, chosen = torch.get_num_threads(), threads._chosen
    yield
    threads._chosen = chosen
    torch.set_num_threads(before)


def test_count_comes_from_omp_num_threads_else_the_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.threads_for_process() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # Ray's floor: at least 1
    assert threads.threads_for_process() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer"):
        threads.threads_for_process()
    monkeypatch.delenv("OMP_NUM_THREADS")
    quota = threads.cpu_quota()
    cpus = len(os.sched_getaffinity(0))
    assert threads.threads_for_process() == (cpus if quota is None else max(1, min(cpus, int(quota))))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_cpu_quota_caps_the_count(tmp_path: Path, monkeypatch) -> None:
    """``--cpus 1`` in a container, ``CPUQuota=150%`` in a systemd unit: the quota along the
    process's cgroup path, the smallest one found, as whole CPUs for the thread count."""
    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    proc.write_text("0::/system.slice/node.service\n")  # cgroup v2, a systemd unit
    _write(root / "system.slice" / "node.service" / "cpu.max", "150000 100000\n")
    _write(root / "system.slice" / "cpu.max", "max 100000\n")
    assert threads.cpu_quota(root, proc) == 1.5
    _write(root / "system.slice" / "cpu.max", "100000 100000\n")  # a tighter parent wins
    assert threads.cpu_quota(root, proc) == 1.0
    # cgroup v1 in a container: /proc names the host's path, the mount is the container's own cgroup
    proc.write_text("9:name=systemd:/libpod_parent/libpod-abc\n4:cpu,cpuacct:/libpod_parent/libpod-abc\n")
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert threads.cpu_quota(root, proc) == 2.0
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert threads.cpu_quota(root, proc) is None
    assert threads.cpu_quota(root, tmp_path / "missing") is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 1.0)
    assert threads.threads_for_process() == 1  # two CPUs in the affinity, one CPU of quota


def test_an_explicit_choice_survives_a_default_call(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads._chosen = None
    assert threads.configure_threads() == 2 and torch.get_num_threads() == 2
    assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert threads.configure_threads() == 1 and torch.get_num_threads() == 1  # e.g. the runner inside
    with pytest.raises(ValueError, match="at least 1"):
        threads.configure_threads(0)


def test_the_fallback_yields_to_omp_num_threads(monkeypatch, restore_threads):
    threads._chosen = None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.configure_threads(fallback=1) == 1  # the in-process runner: as a 1-CPU actor
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.configure_threads(fallback=1) == 2


def _policy_after_import(env: dict) -> str:
    code = "import prism_flwr, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_importing_the_package_sets_the_passive_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_after_import(env) == "PASSIVE False"  # set, and torch not loaded by the import
    assert _policy_after_import({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"  # the user's wins
