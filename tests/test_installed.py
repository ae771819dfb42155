"""A node set up as docs/deployment.md tells real machines to: ``pip install .`` (not editable).

A fresh venv gets the project from a clean copy of the checkout with a regular, non-editable
install (``--no-deps``: the heavy dependencies come from the test venv's site-packages through a
``.pth`` line, which adds that folder to ``sys.path`` without running its editable-install hook).
Its own SuperLink, SuperNode and SuperExecs then run one round of the app on loopback through
the deployment engine: the ServerApp and ClientApps import only the bundle Flower ships and the
installed package, never this checkout. A module missing from the bundle or the package fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tests.support.bundle import app_copy
from tools import procs
from tools.flowerkit import BIN, flower_env, newest_run, online_nodes, write_connection

RUN_TIMEOUT = 300


def _installed_venv(root: Path, app: Path) -> Path:
    """A venv holding a non-editable install of ``app``; Flower's scripts run its interpreter."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    install += ["--no-index", "--ignore-installed", "--no-cache-dir", str(app)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    for source in [*BIN.glob("flwr*"), *BIN.glob("flower-*")]:  # Flower's programs, on this interpreter
        lines = source.read_text().splitlines(keepends=True)
        script = venv / "bin" / source.name
        script.write_text(f"#!{python}\n" + "".join(lines[1:]))
        script.chmod(0o755)
    return venv


def test_round_from_non_editable_install(data_dir: Path, tmp_path: Path) -> None:
    app = app_copy(tmp_path / "app")
    venv = _installed_venv(tmp_path, app)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import prism_flwr.data, sys; print(prism_flwr.__file__); "
         "print(any('editable' in m for m in sys.modules))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [
        str(next(venv.glob("lib/python*/site-packages/prism_flwr/__init__.py"))),
        "False",
    ]

    flwr_home, out, logs, state = (tmp_path / n for n in ("flwr-home", "outputs", "logs", "node-state"))
    logs.mkdir()
    env = flower_env(flwr_home)
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: this venv's only.
    env["PATH"] = os.pathsep.join(
        [str(venv / "bin"), *(p for p in env["PATH"].split(os.pathsep) if p != str(BIN))]
    )
    env.pop("PYTHONPATH", None)
    link_port, node_port = procs.free_port(), procs.free_port()
    write_connection(flwr_home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    bin_ = venv / "bin"
    with procs.Processes() as ps:
        link = ps.start(
            [str(bin_ / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link_port)],
            env=env, log_path=logs / "superlink.log", cwd=flwr_home,
        )  # fmt: skip
        procs.wait_for_port("127.0.0.1", link_port, timeout=60, procs=[link])
        node = ps.start(
            [str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
             "--host", "127.0.0.1", "--port", str(node_port),
             "--node-config", f"partition-id=0 num-partitions=1 data-dir='{data_dir}' state-dir='{state}'"],
            env=env, log_path=logs / "supernode.log", cwd=flwr_home,
        )  # fmt: skip
        procs.wait_for(lambda: len(online_nodes(env, "loopback")) == 1, timeout=60, desc="SuperNode online",
                       procs=[link, node])  # fmt: skip
        run_config = (
            f"num-server-rounds=1 local-steps=2 ngf=4 eval-samples=64 eval-feature-metrics=false "
            f"min-train-nodes=1 output-dir='{out}' data-dir='{data_dir}'"
        )
        t0 = time.monotonic()
        run = ps.start(
            [str(bin_ / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", run_config],
            env=env, log_path=logs / "flwr-run.log", cwd=flwr_home,
        )  # fmt: skip
        try:
            run.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        all_logs = "\n".join(procs.tail(p, 30) for p in sorted(logs.iterdir()))
        newest = newest_run(env, "loopback")
        assert newest["status"] == "finished:completed", f"{newest}\n{all_logs}"
    procs.assert_gone(ps.pids)
    history = json.loads((out / "latest" / "history.json").read_text())
    assert [r["clients"] for r in history if r["round"] >= 1] == [1], history
    assert "No module named" not in all_logs
    print(f"one round from a non-editable install took {time.monotonic() - t0:.0f}s")
