"""No path the server chooses is opened on a node: every file a client reads is node config or the app's.

- ``vgg19-weights`` is node config: a run config naming a file (``/etc/passwd``) is refused before
  the client reads anything, and the file is never opened.
- Every string key of the run config set to a path of the server's: the ClientApp trains a real
  round on the node's own data and never opens, lists or stats anything under those paths (an
  audit hook and ``os.stat`` watch every path the process touches).
- The node's own weights file that is missing or is not a checkpoint gives the server one line that
  is the same in both cases (torch's own error quotes the file's first byte).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

import client_app
from prism_flwr.config import ConfigError, RunConfig
from prism_flwr.federated.client_round import VGG19_UNAVAILABLE
from prism_flwr.federated.methods import PRISM
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores
from tests.support.fixtures_data import write_mnist
from tools.security_probe import message

pytestmark = pytest.mark.usefixtures("task_identity")
TINY = {
    "ngf": 4,
    "local-steps": 1,
    "batch-size": 8,
    "uplink-coding": "raw",
    "device": "cpu",
    "dataset": "mnist",
}
SERVER = "/srv/server-chosen"  # every path the server names starts here
_WATCH = {"on": False, "seen": []}
_EVENTS = ("open", "os.listdir", "os.scandir", "shutil.rmtree", "os.remove", "os.rename", "os.mkdir")


def _audit(event: str, args: tuple) -> None:
    if _WATCH["on"] and event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _WATCH["seen"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed: _WATCH["on"] limits it to the `touched` fixture


@pytest.fixture
def touched(monkeypatch: pytest.MonkeyPatch):
    """Every path this process opens, lists, removes or stats while the test runs."""
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)):
            _WATCH["seen"].append(os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    _WATCH.update(on=True, seen=[])
    yield _WATCH["seen"]
    _WATCH["on"] = False


def _train(run: dict, node: dict, tmp_path: Path):
    """``client_app.train`` on a real Message: round 1, the node's MNIST under its own data-dir."""
    cfg = RunConfig.parse({**TINY, **{k: v for k, v in run.items() if k in RunConfig.model_fields}})
    sent = Array(
        PRISM.downlink(cfg).encode(
            PRISM.downlink(cfg).settle(get_scores(ResnetGenerator(generator_spec(cfg))).numpy())
        )
    )
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 1, "run-tag": "bbbb0001"}),
            PRISM.down_key: ArrayRecord({PRISM.down_key: sent}),
        }
    )
    node_config = {
        "partition-id": 0,
        "num-partitions": 2,
        "data-dir": str(tmp_path / "node-data"),
        "download": False,
        "state-dir": str(tmp_path / "node-state"),
        **node,
    }
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={**TINY, **run}
    )
    return client_app.train(message(0, content), context)


@pytest.fixture
def node_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)
    write_mnist(tmp_path / "node-data", "MNIST", n_train=40, n_test=10)
    return tmp_path


def test_a_run_config_cannot_name_the_vgg19_weights(node_data: Path, touched: list[str], monkeypatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(str(f)))
    with pytest.raises(ConfigError, match="run-config key 'vgg19-weights' is unknown"):
        _train({"features": "vgg19", "vgg19-weights": "/etc/passwd"}, {}, node_data)
    assert loaded == [] and not [p for p in touched if "passwd" in p]


def test_no_server_string_becomes_a_path_on_the_node(node_data: Path, touched: list[str]) -> None:
    # data-dir: replaced by the node's; the others only the ServerApp opens, on the server's machine
    paths = {
        "data-dir": f"{SERVER}/data",
        "output-dir": f"{SERVER}/out",
        "resume-run": "server-chosen",
        "inception-weights": f"{SERVER}/inception.pth",
    }
    strings = {name.replace("_", "-") for name, f in RunConfig.model_fields.items() if f.annotation is str}
    assert strings == set(paths)  # a new string key must be added here (and kept off the node's files)
    reply = _train({**paths, "download": True}, {}, node_data)
    assert reply.content is not None and not reply.has_error()
    assert not [p for p in touched if "server-chosen" in p], touched
    assert any(str(node_data / "node-data") in p for p in touched)  # the node's own data were read


def test_the_nodes_weights_failing_says_nothing_about_its_files(node_data: Path, monkeypatch) -> None:
    loaded: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(str(f)) or real_load(f, *a, **k))
    monkeypatch.setenv("TORCH_HOME", str(node_data / "torch-home"))
    not_a_checkpoint = node_data / "passwd"
    not_a_checkpoint.write_text("root:x:0:0:root:/root:/bin/sh\n")
    reasons = []
    for weights in (node_data / "missing.pth", not_a_checkpoint):
        with pytest.raises(FileNotFoundError) as err:
            _train(
                {"features": "vgg19", "objective": "feature-matching"},
                {"vgg19-weights": str(weights)},
                node_data,
            )
        reasons.append(str(err.value))
    assert reasons == [VGG19_UNAVAILABLE] * 2
    assert loaded == [str(not_a_checkpoint)]  # the node's own file was the one tried
