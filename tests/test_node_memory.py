"""benchmarks/node_memory.py on a stand-in cgroup: a folder with the files a memory cgroup has.

The processes listed in ``cgroup.procs`` are real (this test's own and a child that allocates
64 MiB): their peaks are read from /proc and named by role; the cgroup's counters come from the
files, so the report's limit, peak and OOM kills are the ones written there.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import node_memory

HOLD = "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)  # worker.py warm"


def test_roles_come_from_command_lines() -> None:
    assert (
        node_memory.role("/venv/bin/python /venv/bin/prism-flwr supernode --idle-poll 0.2 --warm --")
        == "SuperNode"
    )
    assert (
        node_memory.role("python -P /x/prism_flwr/deployment/worker.py warm {}") == "ClientApp worker (warm)"
    )
    assert node_memory.role("/venv/bin/python /venv/bin/flower-superexec --insecure") == "SuperExec"
    assert (
        node_memory.role("/venv/bin/python /venv/bin/flwr-clientapp --token t") == "ClientApp (one message)"
    )


def test_samples_processes_and_counters_until_the_cgroup_empties(tmp_path: Path, capsys) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLD])
    procs = tmp_path / "cgroup.procs"
    procs.write_text(f"{child.pid}\n")
    (tmp_path / "memory.limit_in_bytes").write_text(str(512 << 20))
    (tmp_path / "memory.max_usage_in_bytes").write_text(str(300 << 20))
    (tmp_path / "memory.usage_in_bytes").write_text(str(200 << 20))
    (tmp_path / "memory.stat").write_text(f"cache 1\nrss 2\ntotal_cache 3\ntotal_rss {150 << 20}\n")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")

    def empty_later() -> None:
        time.sleep(1.5)
        procs.write_text("")  # the container stopped

    threading.Thread(target=empty_later).start()
    try:
        assert node_memory.main(["--cgroup", str(tmp_path), "--every", "0.1", "--seconds", "30"]) == 0
    finally:
        child.kill()
        child.wait()
    out = capsys.readouterr().out
    report = node_memory.json.loads(out.strip().splitlines()[-1])
    worker = report["processes"]["ClientApp worker (warm)"]
    assert worker["pids"] == 1 and worker["RssAnon"] >= 64, worker  # the child's 64 MiB, touched
    assert report["cgroup_limit_mib"] == 512 and report["cgroup_max_usage_mib"] == 300
    assert report["cgroup_anon_peak_mib"] == 150 and report["oom_kills"] == 2
    assert "ClientApp worker (warm)" in out.splitlines()[1]


SMAPS = """\
00400000-00a5f000 r-xp 00000000 00:2a 123 /usr/bin/qemu-aarch64-static
Anonymous:             0 kB
555566b76000-555568800000 rw-p 00000000 00:00 0                          [heap]
Anonymous:         28160 kB
5500000000-5510000000 rw-p 00000000 00:00 0
Anonymous:         97484 kB
7f0ffb800000-7f1003800000 rwxp 00000000 00:00 0
Anonymous:        131072 kB
"""


def test_qemu_own_memory_is_its_code_buffer_and_heap() -> None:
    """Under emulation the rwx code buffer and qemu's [heap] are the emulator's; the guest's pages
    (here the 95 MiB rw mapping in its address range) are not counted."""
    assert node_memory.emulator_anon(SMAPS) == (28160 + 131072) * 1024
