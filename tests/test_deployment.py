"""Deployment runtime on loopback: a real SuperLink and SuperNodes as processes, the real app.

- ``test_deployment_two_supernodes``: SuperLink + 2 SuperNodes (insecure, CPU), ``flwr run`` of
  this repository for 2 rounds on real Fashion-MNIST through a connection in a temporary
  ``$FLWR_HOME/config.toml``; checks the run's status, ``history.json`` and ``model.prism``; then
  stops every process by PID (process group and descendants) and checks none is left. With nginx
  installed (Debian's ``nginx-light``) the SuperNodes connect through docker/fleet-proxy's
  configuration, and the Control and Runtime APIs are checked to be refused through it.
- ``test_tls_and_supernode_auth``: certificates from ``docker/certs/generate.sh`` (made once per
  test session, tests/conftest.py), a TLS SuperLink with SuperNode authentication; a registered
  ECDSA key joins, an unregistered one is refused (through a TLS fleet-proxy when nginx is installed).
- ``test_app_bundle_is_small``: the FAB Flower builds from the repository stays far below 10 MB.
- ``test_compose_*``: docker/compose.yaml is what docker/gen-compose.py writes, and its services
  are wired consistently (no Docker engine here: structure only, see docs/deployment.md).

No pytest-timeout here: every wait is bounded by a subprocess or polling timeout.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tools import procs
from tools.flowerkit import (
    REPO,
    exe,
    fleet_proxy_command,
    flower_env,
    flwr,
    flwr_json,
    newest_run,
    nginx,
    online_nodes,
    start_superlink,
    start_supernode,
    write_connection,
)

RUN_TIMEOUT = 300  # seconds for `flwr run` (about 90 s on 2 CPU cores)


# ------------------------------------------------------------------------------------------------
def test_deployment_two_supernodes(data_dir: Path, tmp_path: Path) -> None:
    flwr_home, out, logs = tmp_path / "flwr-home", tmp_path / "outputs", tmp_path / "logs"
    state = tmp_path / "node-state"  # the nodes' own folder for client state and the privacy ledger
    node_dirs = f"data-dir='{data_dir}' state-dir='{state}'"
    logs.mkdir()
    env = flower_env(flwr_home)
    link_port, proxy_port, node_ports = procs.free_port(), procs.free_port(), procs.free_ports(2)
    # 1.42: one HTTP server per SuperLink (Fleet + Control + Runtime APIs on --port) and one
    # Runtime API server per SuperNode (--port); no other port is opened by default.
    write_connection(flwr_home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    # two rounds (the second trains on the state the first left on the node), one evaluation after
    # the second: every message kind once more would cost each node another ClientApp process
    run_config = (
        f"num-server-rounds=2 local-steps=2 ngf=4 eval-every=2 eval-samples=64 eval-feature-metrics=false "
        f"output-dir='{out}' data-dir='{data_dir}'"
    )

    t0 = time.monotonic()
    with procs.Processes() as ps:
        link = start_superlink(ps, link_port, env, logs / "superlink.log")
        fleet = link_port
        if nginx():  # the SuperNodes see only the Fleet API, as in docker/compose.yaml
            proxy = ps.start(
                fleet_proxy_command(tmp_path / "proxy", proxy_port, f"127.0.0.1:{link_port}"),
                log_path=logs / "fleet-proxy.log",
            )
            procs.wait_for_port("127.0.0.1", proxy_port, timeout=30, procs=[proxy])
            fleet = proxy_port
        nodes = [
            start_supernode(
                ps,
                f"127.0.0.1:{fleet}",
                port,
                env,
                logs / f"supernode-{i}.log",
                node_config=f"partition-id={i} num-partitions=2 {node_dirs}",
            )
            for i, port in enumerate(node_ports)
        ]
        procs.wait_for(
            lambda: len(online_nodes(env, "loopback")) == 2,
            timeout=60,
            desc="2 SuperNodes online",
            procs=[link, *nodes],
        )

        run = ps.start(
            [exe("flwr"), "run", str(REPO), "loopback", "--stream", "--run-config", run_config],
            env=env,
            log_path=logs / "flwr-run.log",
            cwd=flwr_home,
        )
        try:
            run.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        ps.snapshot()
        all_logs = "\n".join(procs.tail(p, 25) for p in sorted(logs.iterdir()))
        assert run.returncode == 0, (
            f"flwr run did not finish in {RUN_TIMEOUT}s (rc {run.returncode})\n{all_logs}"
        )

        newest = newest_run(env, "loopback")
        assert newest["status"] == "finished:completed", f"{newest}\n{all_logs}"
        assert newest["fab-id"] == "prism-flwr/prism-flwr"
        if fleet == proxy_port:
            _assert_only_fleet_api_passes(env, flwr_home, proxy_port)
    seconds = time.monotonic() - t0
    procs.assert_gone(ps.pids)
    assert len(ps.pids) >= 3 + 2  # superlink, 2 supernodes, flwr run and their superexec helpers

    run_dir = out / "latest"  # every run writes into its own folder; latest points at the newest
    assert run_dir.is_symlink() and (run_dir / ".lock").is_file()
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [r for r in history if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["clients"] == 2, record
        assert 0.0 < record["uplink_bits_per_weight"] <= 1.01, record  # coded: below 1 bit once theta moves
    assert (run_dir / "model.prism").stat().st_size > 0
    # ClientApps write their state under their node's state-dir, never under the server's output-dir.
    assert (state / "runs").is_dir() and not (out / "client-state").exists()
    print(
        f"deployment run (superlink + 2 supernodes{' behind fleet-proxy' if fleet == proxy_port else ''}, "
        f"2 rounds) took {seconds:.0f}s"
    )


def _post(url: str, data: bytes | None = b"", context=None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def _assert_only_fleet_api_passes(
    env: dict, flwr_home: Path, proxy_port: int, ca: Path | None = None
) -> None:
    """Through fleet-proxy (TLS when ``ca`` is given): `flwr ls`/`flwr run` (Control API) and the
    Runtime API get 403, also with dot segments; a Fleet route reaches the SuperLink (415 for an
    empty body) and /health answers 200."""
    config = flwr_home / "config.toml"
    config.write_text(
        config.read_text()
        + f'\n[superlink.via-proxy]\naddress = "127.0.0.1:{proxy_port}"\n'
        + (f'root-certificates = "{ca}"\n' if ca else "insecure = true\n")
    )
    scheme, context = ("https", ssl.create_default_context(cafile=str(ca))) if ca else ("http", None)
    listed = flwr_json(["ls", "via-proxy"], env)
    assert not listed.get("success") and "403" in listed.get("error-message", ""), listed
    run = flwr(["run", str(REPO), "via-proxy"], env, timeout=120)
    assert run.returncode != 0 and "403" in run.stdout + run.stderr, run.stdout + run.stderr
    base = f"{scheme}://127.0.0.1:{proxy_port}"
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/docs",
    ):
        assert _post(base + path, context=context) == 403, path
    assert _post(base + "/v1/fleet/get-run", context=context) == 415  # reached FastAPI: the route exists
    assert _post(base + "/health", data=None, context=context) == 200


# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen"
)
def test_tls_and_supernode_auth(loopback_certs: Path, tmp_path: Path) -> None:
    certs, flwr_home, logs = loopback_certs, tmp_path / "flwr-home", tmp_path / "logs"
    logs.mkdir()
    subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", certs / "ca.crt", certs / "server.pem"],
        check=True,
        capture_output=True,
    )
    for key in ("registered", "stranger"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / key)],
            check=True,
            timeout=30,
        )
    env = flower_env(flwr_home)
    link_port, port_a, port_b, proxy_port = procs.free_ports(4)
    write_connection(
        flwr_home, "tls", f"127.0.0.1:{link_port}", **{"root-certificates": str(certs / "ca.crt")}
    )
    fleet = proxy_port if nginx() else link_port  # TLS proxy: terminates TLS, re-encrypts to the SuperLink

    def supernode(key: str, port: int, pid: int):
        return start_supernode(
            ps,
            f"127.0.0.1:{fleet}",
            port,
            env,
            logs / f"{key}.log",
            node_config=f"partition-id={pid} num-partitions=2",
            link_security=[
                "--root-certificates",
                certs / "ca.crt",
                "--auth-supernode-private-key",
                tmp_path / key,
            ],
            extra=["--max-retries", "3"],
        )

    with procs.Processes() as ps:
        link = ps.start(
            [
                exe("flower-superlink"),
                "--ssl-ca-certfile",
                certs / "ca.crt",
                "--ssl-certfile",
                certs / "server.pem",
                "--ssl-keyfile",
                certs / "server.key",
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--port",
                str(link_port),
            ],
            env=env,
            log_path=logs / "superlink.log",
        )
        procs.wait_for_port("127.0.0.1", link_port, timeout=60, procs=[link])
        if fleet == proxy_port:
            proxy = ps.start(
                fleet_proxy_command(tmp_path / "proxy", proxy_port, f"localhost:{link_port}", certs),
                log_path=logs / "fleet-proxy.log",
            )
            procs.wait_for_port("127.0.0.1", proxy_port, timeout=30, procs=[proxy])
        reply = flwr_json(["supernode", "register", str(tmp_path / "registered.pub"), "tls"], env)
        assert reply.get("success"), reply
        good = supernode("registered", port_a, 0)
        bad = supernode("stranger", port_b, 1)
        online = procs.wait_for(
            lambda: online_nodes(env, "tls"),
            timeout=60,
            desc="the registered node online",
            procs=[link, good],
        )
        assert [n["node-id"] for n in online] == [str(reply["node-id"])]
        procs.wait_for(
            lambda: bad.poll() is not None, timeout=60, desc="the unregistered SuperNode to give up"
        )
        assert bad.returncode != 0
        assert "Failed to activate SuperNode" in bad.log_path.read_text()
        assert len(online_nodes(env, "tls")) == 1
        if fleet == proxy_port:
            _assert_only_fleet_api_passes(env, flwr_home, proxy_port, certs / "ca.crt")
    procs.assert_gone(ps.pids)


# ------------------------------------------------------------------------------------------------
def test_app_bundle_is_small(tmp_path: Path) -> None:
    """Flower caps a FAB at 10 MB; data, outputs and the venv must stay out of it (.gitignore)."""
    env = flower_env(tmp_path / "flwr-home")
    (tmp_path / "flwr-home").mkdir()
    done = subprocess.run(
        [exe("flwr"), "build", "--app", str(REPO)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    fabs = list(tmp_path.glob("*.fab"))
    assert done.returncode == 0 and len(fabs) == 1, done.stdout + done.stderr
    size = fabs[0].stat().st_size
    assert size < 2_000_000, f"FAB is {size / 1e6:.1f} MB (Flower's cap is 10 MB)"
    names = zipfile.ZipFile(fabs[0]).namelist()
    assert not [n for n in names if n.split("/")[0] in {".venv", "data", "outputs", ".git"}], names
    assert "client_app.py" in names and "server_app.py" in names


# ------------------------------------------------------------------------------------------------
def _gen_compose(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "docker" / "gen-compose.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_compose_file_is_generated() -> None:
    assert (REPO / "docker" / "compose.yaml").read_text() == _gen_compose(), (
        "docker/compose.yaml is stale: python docker/gen-compose.py > docker/compose.yaml"
    )
    for name, flags in (("nginx.conf", []), ("nginx-tls.conf", ["--tls"])):
        assert (REPO / "docker" / "fleet-proxy" / name).read_text() == _gen_compose("--proxy-conf", *flags), (
            f"docker/fleet-proxy/{name} is stale: python docker/gen-compose.py --proxy-conf {' '.join(flags)}"
        )


@pytest.mark.parametrize("flags", [["--nodes", "3"], ["--nodes", "2", "--tls", "--auth", "--gpu"]])
def test_compose_services_are_wired(flags: list[str]) -> None:
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(_gen_compose(*flags))
    n = int(flags[1])
    services = spec["services"]
    assert {"superlink", "superexec-serverapp", "fleet-proxy"} <= set(services)
    link = services["superlink"]["command"]
    assert link[link.index("--isolation") + 1] == "process" and link[link.index("--host") + 1] == "0.0.0.0"
    # Control API: the host's loopback only; SuperNodes share no network with the SuperLink.
    assert services["superlink"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services["superlink"]["networks"] == services["superexec-serverapp"]["networks"] == ["control"]
    proxy = services["fleet-proxy"]
    assert proxy["networks"] == ["control", "fleet"]
    assert proxy["ports"] == (["9092:9092"] if "--tls" in flags else ["127.0.0.1:9092:9092"])
    assert proxy["volumes"][0].startswith(f"./fleet-proxy/nginx{'-tls' if '--tls' in flags else ''}.conf:")
    for i in range(n):
        node = services[f"supernode-{i}"]["command"]
        assert node[node.index("--node-config") + 1] == f"partition-id={i} num-partitions={n}"
        assert node[node.index("--superlink") + 1] == "fleet-proxy:9092"
        assert (
            services[f"supernode-{i}"]["networks"]
            == services[f"superexec-clientapp-{i}"]["networks"]
            == ["fleet"]
        )
        assert "ports" not in services[f"supernode-{i}"]
        assert node[node.index("--isolation") + 1] == "process"
        exe = services[f"superexec-clientapp-{i}"]
        assert exe["command"][exe["command"].index("--runtime-api-address") + 1] == f"supernode-{i}:9094"
        assert any(v.endswith(":/app/.cache/prism-flwr/data") for v in exe["volumes"])
        if "--tls" in flags:
            assert "--insecure" not in node and "--root-certificates" in node
        if "--auth" in flags:
            assert "--auth-supernode-private-key" in node
        if "--gpu" in flags:
            assert exe["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert f"supernode-{n}" not in services
    server = services["superexec-serverapp"]["command"]
    assert server[server.index("--runtime-api-address") + 1] == "superlink:8000"
    if "--tls" in flags:
        assert "--insecure" not in link and "--ssl-certfile" in link and "--root-certificates" in server
    if "--auth" in flags:
        assert "--enable-supernode-auth" in link
