"""``output-dir/latest`` names the newest run that wrote something: a run that fails before its
first checkpoint leaves it where it was (the ServerApp's ``main`` called directly, no Flower)."""

import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import server_app
from prism_flwr.storage.checkpoint import checkpoint_files, point_latest

TINY = {
    "ngf": 4,
    "eval-samples": 64,
    "eval-feature-metrics": False,
    "num-server-rounds": 1,
    "dataset": "fmnist",
}


def context(run_id: int, **config) -> Context:
    return Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={**TINY, **config}
    )


class NoNodes:
    """A grid that fails as soon as a training round asks for nodes."""

    def __getattr__(self, name):
        raise RuntimeError(f"no SuperLink ({name})")


def earlier_run(out: Path) -> Path:
    folder = out / "20260101-000000-run1-aaaaaa"
    folder.mkdir(parents=True)
    (folder / "history.json").write_text("[]")
    point_latest(out, folder)
    return folder


def test_a_run_that_fails_before_training_leaves_latest_alone(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "no-data"
    empty.mkdir()
    before = earlier_run(out)
    with pytest.raises(Exception, match="(?i)cifar|download"):  # the dataset is missing
        server_app.main(
            NoNodes(),
            context(
                2, **{"output-dir": str(out), "data-dir": str(empty), "download": False, "dataset": "cifar10"}
            ),
        )
    failed = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p != before]
    assert len(failed) == 1  # the failed run's folder exists, but latest does not name it
    assert os.readlink(out / "latest") == before.name


def test_latest_moves_once_the_run_has_its_first_checkpoint(tmp_path, data_dir):
    out = tmp_path / "out"
    earlier_run(out)
    with pytest.raises(RuntimeError, match="no SuperLink"):  # round 0 evaluated and saved, round 1 fails
        server_app.main(NoNodes(), context(3, **{"output-dir": str(out), "data-dir": str(data_dir)}))
    latest = (out / "latest").resolve()
    assert "run3" in latest.name and (latest / "history.json").is_file() and checkpoint_files(latest)
