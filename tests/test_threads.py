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
    assert threads.threads_for_process() == len(os.sched_getaffinity(0))


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
