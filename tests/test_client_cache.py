"""prism_flwr.data.client_cache: a ClientApp process reads its own images from one file, built once,
refused and rebuilt when it does not match, and never needs torchvision or flwr-datasets then."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_flwr.config import RunConfig
from prism_flwr.data import client_cache
from prism_flwr.data import datasets as data
from prism_flwr.data.partition import label_histogram, partition_indices
from tests.support.fixtures_data import write_mnist

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root: Path, **keys) -> RunConfig:
    return RunConfig.parse({"dataset": "mnist", "data-dir": str(root), "download": False, "seed": 3, **keys})


def _fresh_process_state() -> None:
    """What a new ClientApp process would not have: the in-memory dataset and partitions."""
    data._CACHE.clear()
    client_cache._partitions.cache_clear()


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    write_mnist(tmp_path, "MNIST", n_train=400, n_test=20)
    _fresh_process_state()
    yield tmp_path
    _fresh_process_state()


def _forbid_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read although the cache holds this client")

    monkeypatch.setattr(client_cache, "load_labels", refuse)
    monkeypatch.setattr(client_cache, "load_rows", refuse)


def test_built_once_then_read_alone(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(mnist_root)
    images, hist = client_cache.client_images(cfg, 1, 4)
    full = data.load_dataset("mnist", mnist_root)
    idx = partition_indices(full.labels, 4, "shards", 3, shards_per_partition=4)[1]
    assert torch.equal(images, full.images[torch.as_tensor(idx)])
    assert hist == label_histogram(full.labels, idx, 10) and sum(hist) == len(images) > 0
    assert len(list((mnist_root / client_cache.CACHE_FOLDER).glob("mnist-*.u8"))) == 1
    # the process that built the file reads it back too: file pages, not a copy of its own
    path = str(client_cache.cache_path(cfg, client_cache._key(cfg, 1, 4)))
    assert _mapped_file(images.data_ptr()) == path

    _fresh_process_state()
    _forbid_dataset(monkeypatch)
    again, hist_again = client_cache.client_images(cfg, 1, 4)
    assert torch.equal(again, images) and hist_again == hist
    assert _mapped_file(again.data_ptr()) == path


def _mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return rest[4] if len(rest) == 5 else None
    return None


def test_client_data_is_uint8_read_as_float_a_batch_at_a_time(mnist_root: Path) -> None:
    cfg = _cfg(mnist_root)
    images, hist = client_cache.client_images(cfg, 1, 4)
    data, hist_again = client_cache.client_data(cfg, 1, 4, torch.device("cpu"))
    assert data.pixels.dtype == torch.uint8 and hist_again == hist and len(data) == len(images)
    full = images.float() / 127.5 - 1
    idx = torch.tensor([3, 0, 3, len(images) - 1])
    for key in (idx, slice(2, 9), 5):
        got = data[key]
        assert got.dtype == torch.float32 and torch.allclose(got, full[key], atol=1e-6)
    assert data.device == torch.device("cpu") and data.shape == images.shape
    assert float(data[0].min()) >= -1 and float(data[0].max()) <= 1


@pytest.mark.parametrize("change", ["partition", "seed", "partitioning", "source file"])
def test_what_decides_the_content_names_the_file(mnist_root: Path, change: str) -> None:
    cfg = _cfg(mnist_root)
    before = client_cache.cache_path(cfg, client_cache._key(cfg, 0, 4))
    other, pid = cfg, 0
    if change == "partition":
        pid = 2
    elif change == "seed":
        other = _cfg(mnist_root, seed=4)
    elif change == "partitioning":
        other = _cfg(mnist_root, partitioning="iid")
    else:  # a replaced dataset file: same name, new modification time
        path = mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert client_cache.cache_path(other, client_cache._key(other, pid, 4)) != before


def test_no_key_while_the_dataset_is_missing(tmp_path: Path) -> None:
    assert client_cache._key(_cfg(tmp_path), 0, 4) is None
    with pytest.raises(data.DatasetMissingError):
        client_cache.client_images(_cfg(tmp_path), 0, 4)
    assert not (tmp_path / client_cache.CACHE_FOLDER).exists()


def _rewrite(path: Path, pixels: bytes | None = None, **header) -> None:
    """The file with header fields replaced (None: removed) and, when given, other pixel bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[len(client_cache.MAGIC) : len(client_cache.MAGIC) + 4], "little")
    old = json.loads(raw[len(client_cache.MAGIC) + 4 : len(client_cache.MAGIC) + 4 + size])
    offset = -(-(len(client_cache.MAGIC) + 4 + size) // client_cache.ALIGN) * client_cache.ALIGN
    new = {k: v for k, v in {**old, **header}.items() if v is not None}
    body = json.dumps(new).encode()
    head = client_cache.MAGIC + len(body).to_bytes(4, "little") + body
    start = -(-len(head) // client_cache.ALIGN) * client_cache.ALIGN
    path.write_bytes(head + b" " * (start - len(head)) + (raw[offset:] if pixels is None else pixels))


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncated", "bytes, not the"),
        ("not a cache file", "not a client cache file"),
        ("other key", "written for other data"),
        ("float images", "bytes, not the"),
        ("other shape", "not (N>0, 1, 32, 32)"),
        ("histogram", "does not count"),
        ("missing field", "not key, shape and hist"),
    ],
)
def test_a_file_that_does_not_match_is_refused_and_rebuilt(
    mnist_root: Path, caplog: pytest.LogCaptureFixture, damage: str, reason: str
) -> None:
    cfg = _cfg(mnist_root)
    images, hist = client_cache.client_images(cfg, 0, 4)
    images = images.clone()  # a copy: what came back maps the file that is damaged in place below
    path = client_cache.cache_path(cfg, client_cache._key(cfg, 0, 4))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "not a cache file":
        np.savez(path.open("wb"), images=images.numpy())
    elif damage == "other key":
        _rewrite(path, key='{"format": 1}')
    elif damage == "float images":
        _rewrite(path, pixels=images.numpy().astype(np.float32).tobytes())
    elif damage == "other shape":
        _rewrite(path, shape=[len(images), 3, 32, 32])
    elif damage == "histogram":
        _rewrite(path, hist=[n + 1 for n in hist])
    else:
        _rewrite(path, hist=None)
    _fresh_process_state()
    with caplog.at_level(logging.WARNING, logger="prism.data"):
        again, hist_again = client_cache.client_images(cfg, 0, 4)
    assert torch.equal(again, images) and hist_again == hist
    assert any("refused" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    _fresh_process_state()
    caplog.clear()
    assert torch.equal(client_cache.client_images(cfg, 0, 4)[0], images)  # rebuilt file: read quietly
    assert not caplog.records


def test_an_unwritable_data_dir_only_costs_the_speed_up(
    mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(client_cache, "write_bytes_atomic", read_only)
    images, hist = client_cache.client_images(_cfg(mnist_root), 0, 4)
    assert len(images) == sum(hist) > 0
    assert not (mnist_root / client_cache.CACHE_FOLDER).exists()


def test_partition_id_checked(mnist_root: Path) -> None:
    with pytest.raises(ValueError, match="partition-id 4 outside"):
        client_cache.client_images(_cfg(mnist_root), 4, 4)


def test_a_clientapp_process_with_a_warm_cache_imports_neither_torchvision_nor_flwr_datasets(
    mnist_root: Path,
) -> None:
    client_cache.client_images(_cfg(mnist_root), 1, 4)  # the first process builds the file
    script = (
        "import sys, torch, client_app\n"
        "from prism_flwr.config import RunConfig\nfrom prism_flwr.data.client_cache import client_data\n"
        f"cfg = RunConfig.parse({{'dataset': 'mnist', 'data-dir': {str(mnist_root)!r}, 'download': False, 'seed': 3}})\n"
        "x, hist = client_data(cfg, 1, 4, torch.device('cpu'))\n"
        "print(len(x), sum(hist), [m for m in ('torchvision', 'flwr_datasets', 'datasets', 'pandas', 'pyarrow') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    n, total, imported = out.stdout.split(" ", 2)
    assert int(n) == int(total) > 0 and imported.strip() == "[]"


def test_startup_benchmark_prints_its_table(mnist_root: Path) -> None:
    from benchmarks import clientapp_startup

    out = clientapp_startup.main(
        ["--dataset", "mnist", "--data-dir", str(mnist_root), "--repeats", "1", "--ngf", "4"]
    )
    assert out["images"] > 0 and len(out["cold_s"]) == len(out["warm_s"]) == len(clientapp_startup.PHASES)
    assert all(t >= 0 for t in out["cold_s"] + out["warm_s"])


def test_memory_benchmark_prints_its_table(mnist_root: Path, tmp_path: Path) -> None:
    from benchmarks import client_memory

    tiny = '{"ngf": 4, "local-steps": 1, "batch-size": 8, "eval-samples": 16, "seed": 3}'
    out = client_memory.main(
        ["--dataset", "mnist", "--data-dir", str(mnist_root), "--partitions", "4", "--run-config", tiny,
         "--state-dir", str(tmp_path / "state")]
    )  # fmt: skip
    assert out["images"] > 0 and set(out["summary"]) == {"train", "evaluate"}
    for kind, summary in out["summary"].items():
        rows = out["rows"][kind]
        assert [r[0] for r in rows][:3] == ["python", "import torch", "import Flower"]
        assert all(peak >= rss > 0 for _, rss, peak, *_ in rows)  # the peak never below the current RSS
        assert summary["peak_mib"] == rows[-1][2] >= summary["torch_flower_mib"] > 0
        assert "torchvision" not in summary["imported"]
