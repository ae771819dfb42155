"""Running Flower's own command-line programs from tests: a private FLWR_HOME, offline settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flower-supernode, flwr


def exe(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found (install the project: pip install -e .)")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process of a test: private FLWR_HOME, offline, no update check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # as docker/compose.yaml: tasks start within 0.1 s
            # SuperLink and SuperNode start `flower-superexec` by name: the venv's must come first.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # This checkout's code, also for processes started as scripts (the warm executor's
            # workers) where the venv's editable install belongs to another checkout.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
        }
    )
    return env


def flwr(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=env["FLWR_HOME"]
    )


def flwr_json(args: list[str], env: dict[str, str]) -> dict:
    out = flwr([*args, "--format", "json"], env)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"flwr {' '.join(args)}: not JSON:\n{out.stdout}\n{out.stderr}") from None


def start_superlink(ps, port: int, env: dict[str, str], log_path: Path, extra: tuple[str, ...] = ()):
    """An insecure SuperLink on 127.0.0.1:``port`` (``extra``: more flags, e.g. ``--simulation``),
    started under ``ps`` (tools.procs.Processes) and waited for; returns its process."""
    from tools import procs

    link = ps.start(
        [
            exe("flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            *extra,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        log_path=log_path,
    )
    procs.wait_for_port("127.0.0.1", port, timeout=60, procs=[link])
    return link


def supernode_command(
    superlink: str,
    port: int,
    *,
    node_config: str | None = None,
    link_security: Sequence[str | Path] = ("--insecure",),
    isolation: str | None = None,
    idle_poll: float | None = None,
    warm: bool = False,
    extra: Sequence[str | Path] = (),
) -> list[str | Path]:
    """The one ``flower-supernode`` command line of the tests, benchmarks and experiments: a node of
    ``superlink`` (host:port) with its Runtime API on 127.0.0.1:``port``. ``link_security``: how it
    reaches the SuperLink (``--insecure``, or ``--root-certificates CA`` and auth-key flags);
    ``isolation="process"``: an external executor serves its ClientApps; ``idle_poll``: run through
    ``prism-flwr supernode --idle-poll`` (its 3 s idle wait capped), with ``warm`` also ``--warm``
    (its own thread acquires the tasks for one worker); ``extra``: more flags."""
    program = (
        [exe("flower-supernode")]
        if idle_poll is None
        else [
            sys.executable, "-m", "prism_flwr.cli", "supernode", "--idle-poll", str(idle_poll),
            *(["--warm"] if warm else []), "--",
        ]
    )  # fmt: skip
    return [
        *program,
        "--superlink",
        superlink,
        *link_security,
        *(["--isolation", isolation] if isolation else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--node-config", node_config] if node_config is not None else []),
        *extra,
    ]


def start_supernode(ps, superlink: str, port: int, env: dict[str, str], log_path: Path, cwd=None, **options):
    """Start ``supernode_command(superlink, port, **options)`` under ``ps`` (not waited for)."""
    return ps.start(supernode_command(superlink, port, **options), env=env, log_path=log_path, cwd=cwd)


def start_executor(
    ps,
    port: int,
    env: dict[str, str],
    log_path: Path,
    security: Sequence[str | Path] = ("--insecure",),
    cwd=None,
):
    """One warm ``prism-flwr clientapp-executor`` for the SuperNode whose Runtime API is on
    127.0.0.1:``port`` (``security``: ``--insecure``, or ``--root-certificates CA`` and a secret)."""
    return ps.start(executor_command(port, security), env=env, log_path=log_path, cwd=cwd)


def executor_command(port: int, security: Sequence[str | Path] = ("--insecure",)) -> list[str | Path]:
    prism = [sys.executable, "-m", "prism_flwr.cli", "clientapp-executor"]
    return [*prism, "--runtime-api-address", f"127.0.0.1:{port}", *security]


def write_connection(flwr_home: Path, name: str, address: str, **options: str | bool) -> None:
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def online_nodes(env: dict[str, str], connection: str) -> list[dict]:
    try:
        reply = flwr_json(["supernode", "ls", connection], env)
    except AssertionError:  # not answering yet: poll again
        return []
    return [n for n in reply.get("nodes", []) if n.get("status") == "online"]


def newest_run(env: dict[str, str], connection: str) -> dict:
    """The most recently submitted run on ``connection`` as `flwr ls --format json` reports it."""
    return max(flwr_json(["ls", connection], env)["runs"], key=lambda r: r["pending-at"])


def run_record(env: dict[str, str], connection: str, run_id: str) -> dict:
    """The run ``run_id`` on ``connection`` as `flwr ls --format json` reports it (runs may overlap)."""
    runs = flwr_json(["ls", connection], env)["runs"]
    found = [r for r in runs if r["run-id"] == str(run_id)]
    assert found, f"run {run_id} not listed on {connection}: {runs}"
    return found[0]


# ------------------------------------------------------------------------------------ fleet-proxy
def nginx() -> str | None:
    """The nginx binary (Debian's nginx-light / nginx), or None when it is not installed."""
    for path in ("/usr/sbin/nginx", shutil.which("nginx")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _gen_compose_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_compose", REPO / "docker" / "gen-compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fleet_proxy_command(
    folder: Path, listen_port: int, upstream: str, certs: Path | None = None
) -> list[str]:
    """Write docker/fleet-proxy's nginx.conf for loopback (foreground, files under ``folder``) and
    return the command that runs it: the same generator as the committed files, other addresses."""
    folder.mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private folder
    main = f"{user}daemon off;\npid {folder / 'nginx.pid'};\nerror_log stderr warn;\n"
    conf = _gen_compose_module().nginx_conf(
        certs is not None,
        listen=f"127.0.0.1:{listen_port}",
        upstream=upstream,
        certs=str(certs) if certs else "/etc/nginx/certs",
        main=main,
    )
    temp = "".join(
        f"    {kind}_temp_path {folder / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    (folder / "nginx.conf").write_text(conf)
    return [nginx(), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", "stderr"]
