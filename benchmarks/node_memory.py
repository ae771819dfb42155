"""Where a node's memory goes: every process of one container (its memory cgroup), sampled until it ends.

    python -m benchmarks.node_memory --cgroup /sys/fs/cgroup/memory/libpod_parent/libpod-ID
    python -m benchmarks.node_memory --container NAME          # Podman: its cgroup, found for you

A SuperNode container holds the SuperNode and the processes it starts (a SuperExec and one
ClientApp process per message with Flower's defaults; one warm worker with ``prism-flwr supernode
--warm``). Every ``--every`` seconds this reads each process's resident set from /proc (VmRSS,
RssAnon, RssFile) and the cgroup's own counters, until the cgroup has no process left or
``--seconds`` pass. Per process (named by its role, from its command line) it reports the peak
resident set and the peak anonymous part; anonymous memory is what a memory limit cannot reclaim
(file pages, torch's code among them, the kernel may drop and read again). Then the cgroup's peak
usage, its limit, and its OOM kills. Prints a table and one JSON line.

Under qemu-user emulation (an arm64 image on x86_64) every process also holds qemu's own memory:
its translated code (one read-write-execute mapping, 128 MiB in qemu 7.2, touched as code is
translated) and its own C heap (the ``[heap]`` mapping: the guest's heap lives elsewhere, in the
guest's address range). "qemu" reports that part, so that anon minus qemu estimates what the
same process holds on an arm64 CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROLES = (  # first match of the command line wins
    ("worker.py warm", "ClientApp worker (warm)"),
    ("worker.py once", "ClientApp (one message)"),
    ("flwr-clientapp", "ClientApp (one message)"),
    ("flower-superexec", "SuperExec"),
    ("supernode", "SuperNode"),
)
MIB = 1 << 20


def role(command_line: str) -> str:
    return next((name for key, name in ROLES if key in command_line), command_line[:40] or "?")


def emulator_anon(smaps: str) -> int:
    """Anonymous bytes of qemu-user's own mappings in ``smaps`` text: its code buffer (rwx) and [heap]."""
    total, counting = 0, False
    for line in smaps.splitlines():
        fields = line.split()
        if (
            fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]
        ):  # a mapping's first line
            counting = fields[1] == "rwxp" or fields[-1] == "[heap]"
        elif counting and line.startswith("Anonymous:"):
            total += int(fields[1]) * 1024
    return total


def process_memory(pid: int) -> tuple[str, dict[str, int]] | None:
    """(command line, {VmRSS, RssAnon, RssFile[, qemu]} in bytes), or None once the process is gone."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        if "qemu" in command.split(" ", 1)[0]:
            fields["qemu"] = emulator_anon(Path(f"/proc/{pid}/smaps").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None
    return command.strip(), fields


def read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


def oom_kills(cgroup: Path) -> int:
    for name in ("memory.oom_control", "memory.events"):  # cgroup v1, v2
        try:
            for line in (cgroup / name).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except FileNotFoundError:
            continue
    return 0


def podman_cgroup(container: str) -> Path:
    cid = subprocess.run(
        ["podman", "inspect", "--format", "{{.Id}}", container], capture_output=True, text=True, check=True
    ).stdout.strip()
    for pattern in (f"memory/**/libpod-{cid}", f"**/libpod-{cid}.scope", f"**/libpod-{cid}"):
        for found in Path("/sys/fs/cgroup").glob(pattern):
            if (found / "cgroup.procs").is_file() and any(found.glob("memory.*")):
                return found
    raise SystemExit(f"no memory cgroup found for container {container} ({cid[:12]})")


def cgroup_anon(cgroup: Path) -> int:
    """The cgroup's anonymous memory: memory.stat's total_rss (v1) or anon (v2)."""
    try:
        for line in (cgroup / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ("total_rss", "anon"):
                return int(value)
    except FileNotFoundError:
        pass
    return 0


def sample(cgroup: Path, every: float, seconds: float) -> dict:
    peaks: dict[str, dict[str, int]] = {}  # role -> peak of each field, over all its processes
    pids_seen: dict[str, set[int]] = {}
    usage_peak = anon_peak = 0
    counters: dict[str, int | None] = {}  # read while the cgroup exists: it goes with the container
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            break
        if not pids:
            break
        for pid in pids:
            seen = process_memory(pid)
            if seen is None:
                continue
            name = role(seen[0])
            pids_seen.setdefault(name, set()).add(pid)
            peak = peaks.setdefault(name, {})
            for key, value in seen[1].items():
                peak[key] = max(peak.get(key, 0), value)
        usage = read_int(cgroup / "memory.usage_in_bytes") or read_int(cgroup / "memory.current") or 0
        usage_peak, anon_peak = max(usage_peak, usage), max(anon_peak, cgroup_anon(cgroup))
        counters = {
            "max_usage": read_int(cgroup / "memory.max_usage_in_bytes") or read_int(cgroup / "memory.peak"),
            "limit": read_int(cgroup / "memory.limit_in_bytes") or read_int(cgroup / "memory.max"),
            "oom_kills": oom_kills(cgroup),
        }
        time.sleep(every)
    mib = lambda v: None if v is None else round(v / MIB, 1)  # noqa: E731
    return {
        "processes": {
            name: {"pids": len(pids_seen[name]), **{k: round(v / MIB, 1) for k, v in peak.items()}}
            for name, peak in peaks.items()
        },
        "cgroup_usage_peak_mib": mib(usage_peak),
        "cgroup_anon_peak_mib": mib(anon_peak),
        "cgroup_max_usage_mib": mib(counters.get("max_usage")),
        "cgroup_limit_mib": mib(counters.get("limit")),
        "oom_kills": counters.get("oom_kills", 0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cgroup", type=Path, help="the container's memory cgroup directory")
    where.add_argument("--container", help="a Podman container's name or ID")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--seconds", type=float, default=7200, help="stop sampling after this long")
    args = parser.parse_args(argv)
    cgroup = args.cgroup or podman_cgroup(args.container)
    result = sample(cgroup, args.every, args.seconds)
    emulated = any("qemu" in peak for peak in result["processes"].values())
    qemu_head = f" {'peak qemu':>10}" if emulated else ""
    print(f"{'process':28} {'n':>3} {'peak RSS':>9} {'peak anon':>10} {'peak file':>10}{qemu_head}   (MiB)")
    for name, peak in sorted(result["processes"].items()):
        qemu = f" {peak.get('qemu', 0):>10.1f}" if emulated else ""
        print(
            f"{name:28} {peak['pids']:>3} {peak.get('VmRSS', 0):>9.1f} "
            f"{peak.get('RssAnon', 0):>10.1f} {peak.get('RssFile', 0):>10.1f}{qemu}"
        )
    print(
        f"cgroup: peak usage {result['cgroup_max_usage_mib']} MiB (sampled {result['cgroup_usage_peak_mib']}) "
        f"of {result['cgroup_limit_mib']} MiB; anonymous {result['cgroup_anon_peak_mib']} MiB at most "
        f"(sampled); OOM kills {result['oom_kills']}"
    )
    print(json.dumps({"benchmark": "node_memory", "cgroup": str(cgroup), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
