"""The node runs only the app bundles it trusts (node-config ``trusted-apps``, prism_flwr/deployment/pinning.py).

- The check itself on real FABs built by Flower from tests/apps/warm_app: the pinned bundle passes,
  one changed byte in a module, a stated hash that is not the content's, or a run that names
  another app id or version is refused with one line; no key: every bundle runs (Flower's way).
- Publisher keys: a bundle signed by ``prism-flwr sign-app`` runs on a node that trusts the key;
  one changed byte after signing, another key, a file the manifest does not cover, or a manifest
  line changed with its file is refused.
- Through the deployment engine on loopback, the warm executor (``prism-flwr clientapp-executor``,
  the app pinned by hash) and the stock path (``prism-flwr supernode``: Flower's SuperNode and
  SuperExec, one checked ``flwr-clientapp`` per message; the app signed by a trusted publisher
  key): the pinned app completes a round; the same app with one byte changed gets, at the server,
  an ``INVALID_FAB`` error reply whose reason is that line.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from prism_flwr.deployment.pinning import KEYS_KEY, MANIFEST, PIN_KEY, AppNotTrusted, check_bundle, parse_pins
from prism_flwr.node_config import NodeConfig, NodeConfigError
from tools import procs
from tools.flowerkit import exe, flower_env, newest_run, online_nodes, start_superlink, write_connection

APP = Path(__file__).resolve().parent / "apps" / "warm_app"
APP_ID, APP_VERSION = "prismtest/warmapp", "1.0.0"
INVALID_FAB = 7  # flwr.common.constant.ErrorCode.INVALID_FAB
RUN_TIMEOUT = 120


def _changed_copy(folder: Path) -> Path:
    """The warm app with one byte of its ClientApp module changed (a comment: it still runs)."""
    shutil.copytree(APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
    module = folder / "warm_client.py"
    text = module.read_bytes()
    assert text[:3] == b'"""'
    module.write_bytes(b'"""c' + text[4:])
    return folder


def _fab(app: Path) -> tuple[bytes, str]:
    content = build_fab_from_disk(app)  # what `flwr run APP` sends
    return content, hashlib.sha256(content).hexdigest()


# ------------------------------------------------------------------------------ the check
def test_pinned_bundle_passes_and_any_other_is_refused(tmp_path: Path) -> None:
    content, digest = _fab(APP)
    changed, changed_digest = _fab(_changed_copy(tmp_path / "changed"))
    assert changed_digest != digest
    node = {PIN_KEY: f"{'0' * 64}, sha256:{digest.upper()}"}
    assert check_bundle(node, content, digest, APP_ID, APP_VERSION) == digest
    with pytest.raises(AppNotTrusted, match=f"^node refuses the app: its FAB \\(sha256 {changed_digest}\\)"):
        check_bundle(node, changed, changed_digest, APP_ID, APP_VERSION)
    # the pinned bytes under another stated hash, app id or version would load another installed copy
    with pytest.raises(AppNotTrusted, match="stated hash is not the hash of its content"):
        check_bundle(node, content, changed_digest, APP_ID, APP_VERSION)
    with pytest.raises(AppNotTrusted, match=f"names prismtest/other 1.0.0, FAB {digest} is {APP_ID} 1.0.0"):
        check_bundle(node, content, digest, "prismtest/other", APP_VERSION)
    with pytest.raises(AppNotTrusted, match="names prismtest/warmapp 2.0.0"):
        check_bundle(node, content, digest, APP_ID, "2.0.0")
    assert check_bundle({}, changed, changed_digest, APP_ID, APP_VERSION) is None  # not pinned: Flower's way
    with pytest.raises(AppNotTrusted, match="is not in this node's trusted-apps"):
        check_bundle({PIN_KEY: ""}, content, digest, APP_ID, APP_VERSION)  # pinned to nothing
    with pytest.raises(AppNotTrusted, match="^node refuses every app: trusted-apps: 'abc' is not a SHA-256"):
        check_bundle({PIN_KEY: "abc"}, content, digest, APP_ID, APP_VERSION)


def test_trusted_apps_in_node_config() -> None:
    digest = "ab" * 32
    assert parse_pins(f" {digest},{digest.upper()}\n") == {digest}
    node = NodeConfig.parse({"partition-id": 0, "num-partitions": 1, PIN_KEY: digest}, environ={})
    assert node.trusted_apps == digest
    with pytest.raises(NodeConfigError, match="trusted-apps: 'nope' is not a SHA-256 hash"):
        NodeConfig.parse({"partition-id": 0, "num-partitions": 1, PIN_KEY: f"{digest} nope"}, environ={})
    # the environment's node settings are not where the ClientApp process looks: refused, not ignored
    with pytest.raises(NodeConfigError, match="trusted-apps only as the SuperNode's --node-config"):
        NodeConfig.parse(
            {"partition-id": 0, "num-partitions": 1}, environ={"PRISM_NODE_CONFIG": f"{PIN_KEY}='{digest}'"}
        )


def _key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return path


def _rezip(content: bytes, change) -> bytes:
    """The FAB with ``change(name, data) -> data | None`` applied to every entry (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info, data)
        if (extra := change("<add>", b"")) is not None:
            dst.writestr("extra.py", extra)
    return out.getvalue()


def test_a_publisher_key_admits_its_signed_bundles_only(tmp_path: Path, capsys) -> None:
    from prism_flwr import cli

    app = _changed_copy(tmp_path / "app")
    key, other = _key(tmp_path / "publisher.pem"), _key(tmp_path / "other.pem")
    assert cli.main(["sign-app", str(app), "--key", str(key)]) == 0
    public = capsys.readouterr().out.split("trusted-app-keys='")[1].split("'")[0]
    content, digest = _fab(app)
    node = {KEYS_KEY: public}
    assert check_bundle(node, content, digest, APP_ID, APP_VERSION) == digest
    assert check_bundle({PIN_KEY: "", KEYS_KEY: f"{'1' * 64} {public}"}, content, digest, APP_ID, APP_VERSION)

    def refused(fab: bytes, node_config: dict = node) -> None:
        with pytest.raises(AppNotTrusted, match="nor signed by one of its trusted-app-keys"):
            check_bundle(node_config, fab, hashlib.sha256(fab).hexdigest(), APP_ID, APP_VERSION)

    module = app / "warm_client.py"
    module.write_bytes(module.read_bytes().replace(b'"""c', b'"""d', 1))  # one byte after signing
    refused(_fab(app)[0])
    module.write_bytes(module.read_bytes().replace(b'"""d', b'"""c', 1))
    assert cli.main(["sign-app", str(app), "--key", str(other)]) == 0  # re-signed by another key
    refused(_fab(app)[0])
    assert cli.main(["sign-app", str(app), "--key", str(key)]) == 0
    content = _fab(app)[0]
    capsys.readouterr()
    refused(_rezip(content, lambda n, d: b"import os" if n == "<add>" else d))  # a file outside the manifest
    refused(
        _rezip(content, lambda n, d: None if n == "<add>" else d.replace(b'"""c', b'"""d', 1))
    )  # file changed

    def both(name: str, data: bytes) -> bytes | None:  # the file and its manifest line changed together
        if name == "<add>":
            return None
        new = data.replace(b'"""c', b'"""d', 1) if name == "warm_client.py" else data
        if name == MANIFEST:
            old_module = hashlib.sha256(module.read_bytes()).hexdigest()
            changed = module.read_bytes().replace(b'"""c', b'"""d', 1)
            new = data.replace(old_module.encode(), hashlib.sha256(changed).hexdigest().encode())
        return new

    refused(_rezip(content, both))
    with pytest.raises(NodeConfigError, match="trusted-app-keys: 'xyz' is not an Ed25519 public key"):
        NodeConfig.parse({"partition-id": 0, "num-partitions": 1, KEYS_KEY: "xyz"}, environ={})


# ------------------------------------------------------------------------------ deployment engine
def _node_command(engine: str, link_port: int, node_port: int, entry: str) -> list[str]:
    args = ["--insecure", "--superlink", f"127.0.0.1:{link_port}", "--node-config", entry]
    args += ["--host", "127.0.0.1", "--port", str(node_port)]
    if engine == "warm":
        return [exe("flower-supernode"), *args, "--isolation", "process"]
    # stock: Flower's SuperNode starts Flower's SuperExec, which starts `flwr-clientapp` per message
    return [sys.executable, "-m", "prism_flwr.cli", "supernode", "--idle-poll", "0.2", "--", *args]


def _run(app: Path, env: dict, ps: procs.Processes, out: Path, logs: Path, name: str) -> list[dict]:
    run = ps.start(
        [
            exe("flwr"),
            "run",
            str(app),
            "loopback",
            "--stream",
            "--run-config",
            f"num-rounds=1 out-file='{out}'",
        ],
        env=env,
        log_path=logs / f"flwr-run-{name}.log",
        cwd=env["FLWR_HOME"],
    )
    try:
        run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    all_logs = "\n".join(procs.tail(p, 30) for p in sorted(logs.iterdir()))
    status = newest_run(env, "loopback")["status"]
    assert status == "finished:completed" and out.is_file(), f"{status}\n{all_logs}"
    return json.loads(out.read_text())[0]["replies"]


def _pinned_and_changed(tmp_path: Path, engine: str) -> tuple[Path, Path, str, str]:
    """(pinned app, the same with one byte changed, node-config entry, the refusal's reason).
    The warm engine pins the bundle's hash; the stock engine trusts a publisher key that signed it
    (the byte is changed after signing)."""
    if engine == "warm":
        changed = _changed_copy(tmp_path / "changed-app")
        entry = f"{PIN_KEY}='{_fab(APP)[1]}'"
        return APP, changed, entry, f"is not in this node's {PIN_KEY}"
    from prism_flwr.deployment.publish import sign_app_folder

    signed = shutil.copytree(APP, tmp_path / "signed-app", ignore=shutil.ignore_patterns("__pycache__"))
    public, _ = sign_app_folder(signed, _key(tmp_path / "publisher.pem").read_bytes())
    changed = shutil.copytree(signed, tmp_path / "changed-app")
    module = changed / "warm_client.py"
    module.write_bytes(b'"""c' + module.read_bytes()[4:])
    return (
        signed,
        changed,
        f"{KEYS_KEY}='{public}'",
        f"is not in this node's {PIN_KEY} nor signed by one of its {KEYS_KEY}",
    )


@pytest.mark.parametrize("engine", ["warm", "stock"])
def test_node_runs_only_its_pinned_app(tmp_path: Path, engine: str) -> None:
    pinned, changed, entry, reason = _pinned_and_changed(tmp_path, engine)
    _, changed_digest = _fab(changed)
    flwr_home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    logs.mkdir()
    env = flower_env(flwr_home)
    link_port, node_port = procs.free_port(), procs.free_port()
    write_connection(flwr_home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    with procs.Processes() as ps:
        started = [start_superlink(ps, link_port, env, logs / "superlink.log")]
        node = ps.start(
            _node_command(engine, link_port, node_port, entry), env=env, log_path=logs / "node.log"
        )
        started.append(node)
        if engine == "warm":
            procs.wait_for_port("127.0.0.1", node_port, timeout=60, procs=started)
            executor = [sys.executable, "-m", "prism_flwr.cli", "clientapp-executor", "--insecure"]
            executor += ["--runtime-api-address", f"127.0.0.1:{node_port}"]
            started.append(ps.start(executor, env=env, log_path=logs / "executor.log"))
        procs.wait_for(
            lambda: len(online_nodes(env, "loopback")) == 1,
            timeout=60,
            desc="SuperNode online",
            procs=started,
        )
        allowed = _run(pinned, env, ps, tmp_path / "allowed.json", logs, "allowed")
        refused = _run(changed, env, ps, tmp_path / "refused.json", logs, "refused")
        ps.snapshot()
    procs.assert_gone(ps.pids)
    assert len(allowed) == 1 and allowed[0]["handled"] == 1, allowed  # the pinned app ran its round
    assert refused == [
        {"code": INVALID_FAB, "error": f"node refuses the app: its FAB (sha256 {changed_digest}) {reason}"}
    ]
