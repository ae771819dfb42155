"""The warm ClientApp executor (prism_flwr/deployment/: executor.py, worker.py, supernode.py) on loopback.

Per test, a SuperLink, SuperNodes started with ``--isolation process``, one ``prism-flwr
clientapp-executor`` per SuperNode, and the tiny app in tests/apps/warm_app (no torch, no data):
each reply carries the PID of the process that ran the handler and how many messages that
process has handled, so the tests see whether one process served every message.

Every SuperNode here runs through ``prism-flwr supernode --idle-poll 0.2`` (Flower's SuperNode, its
3 s idle wait capped: the executor, not the SuperNode, is what these tests check); Flower's own
``flower-supernode`` with this executor is exercised by tests/test_app_pinning.py (``warm``).

- ``test_one_process_serves_every_round``: 3 rounds, 2 SuperNodes; per node one PID for all
  rounds, the module counter counts 1, 2, 3, and ``context.state`` still goes back to the node.
- ``test_raising_handler_gives_error_reply_and_goes_on``: round 2's handler raises: Flower's
  error reply (code 2, the exception in the reason) comes back and round 3 is served by the same
  process.
- ``test_tls_runtime_api_and_superexec_secret``: the SuperNode's Runtime API over TLS with a
  SuperExec secret; the executor connects with the CA and the secret; one with a wrong secret is
  refused at once with the reason.
- ``test_dead_worker_is_replaced``: the process serving round 1 dies after replying; the
  executor starts a new one, which serves rounds 2 and 3 (the executor itself stays up).
- ``test_warm_supernode_runs_no_superexec``: ``prism-flwr supernode --warm`` and no executor of
  its own: one worker, a child of the SuperNode, serves 3 rounds; no SuperExec process exists; an
  executor without the node's fresh secret is refused; ``..._over_tls``: with the Runtime API on
  TLS and a secret of one's own, which the node's thread then uses.
- ``test_supernode_waits_are_capped``: the SuperNode loop's sleeps are capped, and a loop that
  does not look like 1.42.0's is refused.
- ``test_refuses_other_flower_versions``: the version pin, as a function and through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tools import procs
from tools.flowerkit import (
    exe,
    executor_command,
    flower_env,
    newest_run,
    online_nodes,
    start_executor,
    start_superlink,
    start_supernode,
    write_connection,
)

APP = Path(__file__).resolve().parent / "apps" / "warm_app"
RUN_TIMEOUT = 120  # seconds for `flwr run` of 3 rounds (about 15 s on 2 busy cores)
IDLE_POLL = 0.2  # seconds the SuperNodes wait before asking the SuperLink again (Flower's: 3)


@pytest.fixture
def superlink(tmp_path_factory: pytest.TempPathFactory):
    """An insecure SuperLink for one test's run: (its port, the Flower environment whose FLWR_HOME
    names it "loopback"). One per test, not per module: a stopped SuperNode of the wrapper stays
    "online" at its SuperLink for about a minute, and the app sends to every online node."""
    home = tmp_path_factory.mktemp("superlink")
    env, port = flower_env(home / "flwr-home"), procs.free_port()
    write_connection(home / "flwr-home", "loopback", f"127.0.0.1:{port}", insecure=True)
    with procs.Processes() as ps:
        start_superlink(ps, port, env, home / "superlink.log")
        yield port, env
    procs.assert_gone(ps.pids)


def _run_warm(
    superlink: tuple[int, dict],
    tmp_path: Path,
    nodes: int,
    run_config: str,
    secured: tuple[Path, Path] | None = None,
    in_node: bool = False,
    check_running=None,
) -> tuple[list[dict], procs.Processes]:
    """``nodes`` SuperNodes (process isolation, ``prism-flwr supernode --idle-poll 0.2``) of
    ``superlink`` + one warm executor each; run the app. With ``secured`` (certificate folder, SuperExec secret file) their Runtime API is TLS with the secret.
    ``in_node``: ``--warm`` SuperNodes, no executor started beside them; ``check_running(supernodes,
    ports)`` is called once the run is over, the nodes still up."""
    (link_port, env), logs, out = superlink, tmp_path / "logs", tmp_path / "rounds.json"
    flwr_home = Path(env["FLWR_HOME"])
    logs.mkdir()
    node_ports = procs.free_ports(nodes)
    with procs.Processes() as ps:
        started = []
        for i, port in enumerate(node_ports):
            node_tls, executor_tls = [], ["--insecure"]  # the SuperNode's --insecure is for the SuperLink
            if secured is not None:
                certs, secret = secured
                node_tls = [
                    "--ssl-certfile",
                    certs / "server.pem",
                    "--ssl-keyfile",
                    certs / "server.key",
                    "--ssl-ca-certfile",
                    certs / "ca.crt",
                    "--superexec-auth-secret-file",
                    secret,
                ]
                executor_tls = [
                    "--root-certificates",
                    certs / "ca.crt",
                    "--superexec-auth-secret-file",
                    secret,
                ]
            started.append(
                start_supernode(
                    ps,
                    f"127.0.0.1:{link_port}",
                    port,
                    env,
                    logs / f"supernode-{i}.log",
                    isolation=None if in_node else "process",
                    idle_poll=IDLE_POLL,
                    warm=in_node,
                    extra=node_tls,
                )
            )
            procs.wait_for_port("127.0.0.1", port, timeout=60, procs=started)
            if secured is not None:  # a wrong secret is refused at once, with the reason
                wrong = tmp_path / "wrong.secret"
                wrong.write_bytes(b"not the secret")
                refused = subprocess.run(
                    executor_command(port, [*executor_tls[:-1], wrong]),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert refused.returncode == 2, refused.stderr[-2000:]
                assert "refused AcquireTask" in refused.stderr, refused.stderr[-2000:]
            if not in_node:
                started.append(start_executor(ps, port, env, logs / f"executor-{i}.log", executor_tls))
        procs.wait_for(
            lambda: len(online_nodes(env, "loopback")) == nodes,
            timeout=60,
            desc=f"{nodes} SuperNodes online",
            procs=started,
        )
        run = ps.start(
            [
                exe("flwr"),
                "run",
                str(APP),
                "loopback",
                "--stream",
                "--run-config",
                f"out-file='{out}' {run_config}",
            ],
            env=env,
            log_path=logs / "flwr-run.log",
            cwd=flwr_home,
        )
        try:
            run.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        ps.snapshot()
        all_logs = "\n".join(procs.tail(p, 30) for p in sorted(logs.iterdir()))
        status = newest_run(env, "loopback")["status"]
        assert status == "finished:completed" and out.is_file(), f"{status}\n{all_logs}"
        executors = [p for p in ps.started if "clientapp-executor" in " ".join(map(str, p.args))]
        assert all(p.poll() is None for p in executors), f"an executor exited\n{all_logs}"
        if check_running is not None:
            check_running([p for p in started if p not in executors], node_ports)
    procs.assert_gone(ps.pids)
    return json.loads(out.read_text()), ps


def _by_process(rounds: list[dict]) -> dict[int, list[dict]]:
    served: dict[int, list[dict]] = {}
    for record in rounds:
        for reply in record["replies"]:
            if "pid" in reply:
                served.setdefault(int(reply["pid"]), []).append(reply)
    return served


def test_one_process_serves_every_round(superlink, tmp_path: Path) -> None:
    rounds, ps = _run_warm(superlink, tmp_path, nodes=2, run_config="num-rounds=3")
    assert [len(r["replies"]) for r in rounds] == [2, 2, 2]
    served = _by_process(rounds)
    assert len(served) == 2, served  # one process per SuperNode, the same in every round
    for pid, replies in served.items():
        assert [r["round"] for r in replies] == [1, 2, 3]
        assert [r["handled"] for r in replies] == [1, 2, 3]  # module state kept between messages
        assert [r["state_seen"] for r in replies] == [1, 2, 3]  # context.state went back to the SuperNode
        assert pid in ps.pids and pid not in {p.pid for p in ps.started}  # a worker below an executor


def test_raising_handler_gives_error_reply_and_goes_on(superlink, tmp_path: Path) -> None:
    rounds, _ = _run_warm(superlink, tmp_path, nodes=1, run_config="num-rounds=3 raise-round=2")
    first, failed, last = (r["replies"] for r in rounds)
    assert len(failed) == 1 and "error" in failed[0], failed
    assert failed[0]["code"] == 2 and "injected failure in round 2" in failed[0]["error"]  # CLIENT_APP_RAISED
    assert first[0]["pid"] == last[0]["pid"]  # the same process goes on after the exception
    assert (first[0]["handled"], last[0]["handled"]) == (1, 3)  # the raising message was handled too
    assert last[0]["state_seen"] == 2  # the failed task did not change the node's context


def test_tls_runtime_api_and_superexec_secret(superlink, loopback_certs: Path, tmp_path: Path) -> None:
    certs, secret = loopback_certs, tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    rounds, _ = _run_warm(superlink, tmp_path, nodes=1, run_config="num-rounds=2", secured=(certs, secret))
    assert [r["replies"][0]["handled"] for r in rounds] == [1, 2]


def test_dead_worker_is_replaced(superlink, tmp_path: Path) -> None:
    rounds, _ = _run_warm(superlink, tmp_path, nodes=1, run_config="num-rounds=3 crash-round=1 pause=2.0")
    first, second, third = (r["replies"][0] for r in rounds)
    assert "pid" in second and "pid" in third, rounds  # it died between messages: no task was lost
    assert second["pid"] != first["pid"] and third["pid"] == second["pid"]
    assert (second["handled"], third["handled"]) == (1, 2)  # a new process: its module state starts afresh
    assert third["state_seen"] == 3  # context.state lives in the SuperNode, not in the process


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_warm_supernode_runs_no_superexec(superlink, tmp_path: Path) -> None:
    seen: dict = {}

    def check_running(supernodes, ports) -> None:
        (node,), (port,) = supernodes, ports
        seen["children"] = [_command_line(pid) for pid in procs.descendants(node.pid)]
        seen["outsider"] = subprocess.run(  # an executor without the node's fresh secret
            executor_command(port, ["--insecure"]),
            env=superlink[1],
            capture_output=True,
            text=True,
            timeout=60,
        )

    rounds, ps = _run_warm(
        superlink, tmp_path, nodes=1, run_config="num-rounds=3", in_node=True, check_running=check_running
    )
    served = _by_process(rounds)
    assert len(served) == 1, served
    ((pid, replies),) = served.items()
    assert [r["handled"] for r in replies] == [1, 2, 3] and [r["state_seen"] for r in replies] == [1, 2, 3]
    children = seen["children"]
    assert len(children) == 1 and "worker.py warm" in children[0], children  # the worker, nothing else
    assert not any("superexec" in c for c in children), children
    outsider = seen["outsider"]
    assert outsider.returncode == 2 and "refused AcquireTask" in outsider.stderr, outsider.stderr[-2000:]


def test_warm_supernode_over_tls(superlink, loopback_certs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    rounds, _ = _run_warm(
        superlink,
        tmp_path,
        nodes=1,
        run_config="num-rounds=2",
        secured=(loopback_certs, secret),
        in_node=True,
    )
    assert [r["replies"][0]["handled"] for r in rounds] == [1, 2]


def test_warm_refuses_another_isolation(capsys: pytest.CaptureFixture) -> None:
    from flwr.supernode import start_client_internal as loop

    from prism_flwr import cli

    argv = ["supernode", "--warm", "--", "--insecure", "--isolation", "subprocess"]
    assert cli.main(argv) == 2
    assert "--warm runs the SuperNode with --isolation process" in capsys.readouterr().err
    assert loop.time is time  # refused before anything in this process was changed


def test_supernode_waits_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    from prism_flwr.deployment import supernode

    asked: list[float] = []
    capped = supernode.CappedSleep(0.2, sleep=asked.append)
    for seconds in (3, 0.5, 0.1):
        capped.sleep(seconds)
    assert asked == [0.2, 0.2, 0.1]
    assert capped.monotonic is time.monotonic  # the rest of the time module is untouched
    monkeypatch.setattr(loop, "time", loop.time)  # undone after the test
    supernode.shorten_supernode_poll(0.2)  # the 1.42 loop still has its `time.sleep(3)`
    assert isinstance(loop.time, supernode.CappedSleep) and loop.time.cap == 0.2
    with pytest.raises(supernode.UnsupportedFlowerVersion, match="does not sleep as 1.42.0"):
        supernode.shorten_supernode_poll(0.2)  # a loop that is not the one we know is refused


def test_refuses_other_flower_versions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from prism_flwr import cli
    from prism_flwr.deployment import runtime_api

    for version in ("1.42.0", "1.42.7"):
        assert runtime_api.check_flower_version(version) == version
    for version in ("1.43.0", "1.41.2", "2.0.0", "1.4.2"):
        with pytest.raises(runtime_api.UnsupportedFlowerVersion, match=f"installed Flower is {version}"):
            runtime_api.check_flower_version(version)
    monkeypatch.setattr(runtime_api, "installed_flower_version", lambda: "1.43.0")
    assert cli.main(["clientapp-executor", "--insecure", "--runtime-api-address", "127.0.0.1:9"]) == 2
    assert "tested with Flower 1.42.x only" in capsys.readouterr().err
    for command in (["supernode", "--", "--insecure"], ["clientapp", "--insecure", "--token", "t"]):
        assert cli.main(command) == 2  # the SuperNode wrapper and the checked clientapp refuse it too
        assert "tested with Flower 1.42.x only" in capsys.readouterr().err


def test_warm_executor_end_stops_the_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the thread's executor stop (a refused secret, a bug), the SuperNode process is sent
    SIGTERM: a node that is online but serves nothing would hold every round up to its timeout."""
    import signal

    from prism_flwr.deployment import executor, supernode

    def refused(*_args, **_kwargs):
        raise executor.RuntimeApiRefused("the Runtime API refused AcquireTask (HTTP 401)")

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(executor, "serve", refused)
    monkeypatch.setattr(supernode.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    supernode.serve_in_thread(executor.Endpoint("127.0.0.1:9"), 0.1).join(timeout=10)
    assert sent == [(os.getpid(), signal.SIGTERM)]
