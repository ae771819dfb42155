"""The app bundle (FAB) that Flower ships to every node holds every module of the apps.

Flower packs the bundle through ``.gitignore``; a node puts the unpacked bundle first on
``sys.path``, so a module missing from it fails the node's first message (an editable install
hides this, a real node does not). Built from a clean copy of the checkout (tests/support/bundle.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from tests.support.bundle import PACKAGES, app_copy, app_modules, build_fab


def _fab_names(tmp_path: Path, ignore: str | None = None) -> set[str]:
    app = app_copy(tmp_path / "app")
    if ignore is not None:
        (app / ".gitignore").write_text(ignore)
    return set(zipfile.ZipFile(build_fab(app, tmp_path)).namelist())


def test_bundle_holds_every_app_module(tmp_path: Path) -> None:
    names = _fab_names(tmp_path)
    missing = [m for m in app_modules() if m not in names]
    assert not missing, f"the FAB lacks {missing}: check .gitignore (anchor folder patterns with '/')"
    # every package folder is a regular package: a namespace portion would import from elsewhere
    folders = {str(Path(m).parent.as_posix()) for m in app_modules() if m.split("/")[0] in PACKAGES}
    assert not [f for f in folders if f"{f}/__init__.py" not in names], sorted(folders)
    assert not [n for n in names if n.split("/")[0] in {".venv", "data", "outputs", ".git"}]


def test_unanchored_pattern_is_caught(tmp_path: Path) -> None:
    """The check above fails for the .gitignore line that once broke every deployment."""
    names = _fab_names(tmp_path, ignore="data/\n")
    assert [m for m in app_modules() if m not in names] == sorted(
        m for m in app_modules() if m.startswith("prism_flwr/data/")
    )


# A ClientApp process answering train and evaluate, as Flower runs it: what it imports.
CLIENT = r"""
import json, sys, time
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity
import client_app
from prism_flwr.config import RunConfig
from prism_flwr.federated.methods import method_for
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_flat
keys = json.loads(sys.argv[1])
cfg = RunConfig.parse(keys)
method = method_for(cfg)
down = method.downlink(cfg)
vector = down.settle(get_flat(ResnetGenerator(generator_spec(cfg)), method.vector_attr).numpy())
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
for kind in ("train", "evaluate"):
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "run-tag": "aaaa0001"}),
                          method.down_key: ArrayRecord({method.down_key: Array(down.encode(vector))})})
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=kind)
    node = {"partition-id": 0, "num-partitions": 2, "data-dir": keys["data-dir"], "state-dir": sys.argv[2]}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=keys)
    assert getattr(client_app, kind)(Message(metadata=meta, content=content), context).content is not None
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, transitively, as installed here (normalised names)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen, todo = set(), [(norm(n), "") for n in names]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(norm(req.name), e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def test_clientapp_imports_only_the_client_requirements(tmp_path: Path) -> None:
    """docker/client-requirements.txt (+ torch) is all a ClientApp needs: the edge images install
    nothing else (no torchvision). Each message cold: the node's cache is built by the process."""
    import importlib.metadata as md
    import json
    import os
    import re
    import subprocess
    import sys

    from packaging.requirements import Requirement

    from tests.support.fixtures_data import write_mnist
    from tools.flowerkit import REPO

    write_mnist(tmp_path / "data", "MNIST", n_train=200, n_test=20)
    keys = {"dataset": "mnist", "data-dir": str(tmp_path / "data"), "download": False, "ngf": 4,
            "local-steps": 1, "batch-size": 8, "eval-samples": 16}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(keys), str(tmp_path / "state")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    modules = set(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = (REPO / "docker" / "client-requirements.txt").read_text().splitlines()
    listed = [Requirement(line).name for line in lines if line.strip() and not line.startswith("#")]
    allowed = _closure([*listed, "torch"])
    owners = md.packages_distributions()
    local = {"client_app", "prism_flwr", "strategies", "__main__"}
    # optional imports, taken when installed (try/except): torch.hub's tqdm, torch.utils.data's dill
    local |= {"tqdm", "dill"}
    foreign = {
        m: owners[m]
        for m in modules - set(sys.stdlib_module_names) - local
        if m in owners and not {re.sub(r"[-_.]+", "-", d).lower() for d in owners[m]} & allowed
    }
    assert not foreign, f"imported by a ClientApp but not in docker/client-requirements.txt: {foreign}"
    assert "torchvision" not in modules
    # partitioning is numpy's: a node holds no data-frame stack, even while building its cache
    assert not modules & {"flwr_datasets", "datasets", "pandas", "pyarrow"}, sorted(modules)
    assert "sympy" not in modules  # nor torch's compiler stack (prism_flwr/eager_torch.py)
