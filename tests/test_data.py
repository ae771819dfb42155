"""prism_flwr.data.datasets: real Fashion-MNIST from the Debian package, fixtures for the other datasets."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd
from torchvision import transforms as T

from prism_flwr.data import datasets as data
from prism_flwr.data.datasets import DatasetMissingError, load_dataset
from prism_flwr.data.idx import read_idx
from tests.support.fixtures_data import (
    fake_urlopen,
    gzip_file,
    tar_gz_folder,
    write_celeba,
    write_cifar10,
    write_idx,
    write_mnist,
)

needs_fmnist = pytest.mark.skipif(
    not all((data.FMNIST_SYSTEM_DIR / f"{f}.gz").is_file() for f in data._IDX_FILES),
    reason=f"Fashion-MNIST not in {data.FMNIST_SYSTEM_DIR} (Debian package dataset-fashion-mnist not installed)",
)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fmnist")


@needs_fmnist
def test_fmnist_train_from_debian_package(fmnist_dir: Path) -> None:
    train = load_dataset("fmnist", fmnist_dir)
    assert train.name == "fmnist" and train.num_classes == 10 and len(train) == 60_000
    assert train.images.shape == (60_000, 1, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [6000] * 10
    # prepared in torchvision's layout, uncompressed
    assert (
        fmnist_dir / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    ).stat().st_size == 16 + 60_000 * 784
    x = train.to_float(np.arange(2000))
    assert x.dtype == torch.float32 and x.shape == (2000, 1, 32, 32)
    assert x.min().item() == -1.0 and x.max().item() == pytest.approx(1.0)
    assert load_dataset("fmnist", str(fmnist_dir / "sub" / "..")) is train  # cached by resolved path


@needs_fmnist
def test_fmnist_test_split_reads_prepared_files(fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset("fmnist", fmnist_dir)  # prepares the raw files (cached if the test above ran)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", fmnist_dir / "no-such-dir")
    test = load_dataset("fmnist", fmnist_dir, train=False)
    assert test.images.shape == (10_000, 1, 32, 32)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_mnist_fixture_resized_like_pil(tmp_path: Path) -> None:
    written = write_mnist(tmp_path, "MNIST", n_train=50, n_test=20)
    images = written["train_images"]
    images[0] = 200  # a constant image must stay constant
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", images)

    train = load_dataset("mnist", tmp_path)
    assert train.images.shape == (50, 1, 32, 32) and train.images.dtype == torch.uint8
    np.testing.assert_array_equal(train.labels, written["train_labels"])
    assert (train.images[0] == 200).all()
    # the vectorised resize matches the paper's per-image PIL Resize(32) up to rounding
    pil = torch.stack(
        [T.functional.pil_to_tensor(T.Resize(32)(Image.fromarray(a, mode="L"))) for a in images]
    )
    assert (train.images.int() - pil.int()).abs().max().item() <= 1
    test = load_dataset("mnist", tmp_path, train=False)
    assert len(test) == 20 and test is not train


def test_idx_files_read_as_torchvision_reads_them(tmp_path: Path) -> None:
    written = write_mnist(tmp_path, "MNIST", n_train=30, n_test=5)
    raw = tmp_path / "MNIST" / "raw"
    theirs = tvd.MNIST(tmp_path, train=True)
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte"), theirs.data.numpy())
    assert np.array_equal(read_idx(raw / "train-labels-idx1-ubyte"), theirs.targets.numpy())
    assert np.array_equal(read_idx(raw / "train-images-idx3-ubyte"), written["train_images"])
    bad = tmp_path / "bad"
    bad.write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes of data for dimensions"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # float32 idx: not what MNIST holds
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        read_idx(bad)


def test_file_lists_are_torchvisions(tmp_path: Path) -> None:
    """expected_files names what torchvision's loaders read, without importing torchvision."""
    cifar = [f for f, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list] + [tvd.CIFAR10.meta["filename"]]
    assert data.expected_files("cifar10", tmp_path) == [tmp_path / tvd.CIFAR10.base_folder / f for f in cifar]
    base = tmp_path / tvd.CelebA.base_folder
    texts = [base / f for _, _, f in tvd.CelebA.file_list if not f.endswith(".zip")]
    assert data.expected_files("celeba", tmp_path) == [base / "img_align_celeba", *texts]


def test_cifar10_fixture(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, per_batch=3, n_test=4)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:  # the official pickle layout
        assert {b"batch_label", b"labels", b"data", b"filenames"} == set(pickle.load(f, encoding="bytes"))

    train = load_dataset("cifar10", tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and train.num_classes == 10
    np.testing.assert_array_equal(train.images.numpy(), written["train_images"])  # constant colours kept
    np.testing.assert_array_equal(train.labels, written["train_labels"])
    x = train.to_float([0])
    assert torch.allclose(
        x[0, :, 5, 7], torch.from_numpy(written["train_images"][0, :, 0, 0]).float() / 127.5 - 1
    )
    test = load_dataset("cifar10", tmp_path, train=False)
    np.testing.assert_array_equal(test.images.numpy(), written["test_images"])
    assert load_dataset("cifar10", tmp_path) is train


def test_celeba_fixture_centre_crop_and_male_labels(tmp_path: Path) -> None:
    partitions = [0, 0, 0, 1, 2, 2]
    male = [1, 0, 1, 1, 0, 1]
    greens = [100, 140, 180, 200, 120, 160]
    write_celeba(tmp_path, partitions, male, greens)

    train = load_dataset("celeba", tmp_path)
    assert (
        train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8 and train.num_classes == 2
    )
    np.testing.assert_array_equal(train.labels, [1, 0, 1])
    # the red border lies outside the central 160x160 crop: gone after CenterCrop(160) + Resize(32)
    assert train.images[:, 0].max().item() < 20, "red border survived the centre crop"
    green = train.images[:, 1].float().mean(dim=(1, 2))
    np.testing.assert_allclose(green.numpy(), greens[:3], atol=4)
    test = load_dataset("celeba", tmp_path, train=False)
    np.testing.assert_array_equal(test.labels, [0, 1])
    np.testing.assert_allclose(test.images[:, 1].float().mean(dim=(1, 2)).numpy(), greens[4:], atol=4)


@pytest.mark.parametrize(
    "name, layout",
    [
        (
            "mnist",
            "MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte  (uncompressed idx files)",
        ),
        (
            "fmnist",
            "FashionMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte  (uncompressed idx files)",
        ),
        ("cifar10", "cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta"),
        (
            "celeba",
            "celeba/img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt, identity_CelebA.txt, "
            "list_bbox_celeba.txt, list_landmarks_align_celeba.txt",
        ),
    ],
)
def test_missing_dataset_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, layout: str
) -> None:
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", tmp_path / "no-debian-package")
    root = (tmp_path / "data").resolve()
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset(name, root)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert message.startswith(
        f"Dataset '{name}' not found (download is off). Looked for these files, missing:\n"
    )
    for path in data.expected_files(name, root):
        assert f"\n  {path}\n" in message
    assert (
        '  - set run-config key `download` to "auto" (the default) on a machine with internet '
        f"(flwr run . --run-config 'download=\"auto\"'); torchvision downloads it once into {root}"
    ) in message
    assert f"  - put the files there yourself, in this layout:\n      {root}/{layout}" in message
    assert "or set run-config key `data-dir` to a directory with this layout" in message
    has_apt = f"  - apt-get install dataset-fashion-mnist (Debian/Ubuntu); its files in {tmp_path / 'no-debian-package'}"
    assert (has_apt in message) == (name == "fmnist")
    if name == "fmnist":
        assert f"\n  {tmp_path / 'no-debian-package' / 'train-images-idx3-ubyte.gz'}\n" in message


def test_partial_cifar10_names_only_missing_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=1, n_test=1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(
        DatasetMissingError, match=r"missing:\n  \S+/cifar-10-batches-py/data_batch_3\nGet it"
    ):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset_and_image_data_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of mnist, fmnist, cifar10, celeba"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, 1, 32, 32\)"):
        data.ImageData("mnist", torch.zeros(2, 1, 28, 28, dtype=torch.uint8), np.zeros(2, np.int64), 10)
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 32, 32).contiguous()
    pair = data.ImageData("mnist", images, np.array([3, 4]), 10)
    assert pair.to_float().amin(dim=(1, 2, 3)).tolist() == [-1.0, 1.0]
    assert pair.to_float(np.array([1])).shape == (1, 1, 32, 32)


# ---- downloads: torchvision's real download and extraction code, with urlopen stubbed ----


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_CACHE", {})
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", Path("/nonexistent-debian-package"))


def _serve_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: type) -> tuple[dict, list[str]]:
    """MNIST-format fixtures gzipped and served at the loader's first mirror (md5s set to theirs)."""
    written = write_mnist(tmp_path / "source", "X", n_train=30, n_test=10)
    files, resources = {}, []
    for name in data._IDX_FILES:
        body = gzip_file(tmp_path / "source" / "X" / "raw" / name, tmp_path / f"{name}.gz")
        files[f"{loader.mirrors[0]}{name}.gz"] = body
        resources.append((f"{name}.gz", hashlib.md5(body).hexdigest()))
    monkeypatch.setattr(loader, "resources", resources)
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(files, calls))
    return written, calls


@pytest.mark.parametrize("name, loader", [("mnist", tvd.MNIST), ("fmnist", tvd.FashionMNIST)])
def test_auto_download_fetches_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_cache: None,
    capsys: pytest.CaptureFixture,
    name: str,
    loader: type,
) -> None:
    written, calls = _serve_mnist(tmp_path, monkeypatch, loader)
    root = tmp_path / "data"
    train = load_dataset(name, root, download="auto")
    assert len(train) == 30 and train.images.shape == (30, 1, 32, 32)
    np.testing.assert_array_equal(train.labels, written["train_labels"])
    assert len(load_dataset(name, root, train=False, download="auto")) == 10
    fetched = [url for url in calls if url.endswith(".gz")]
    assert sorted(set(fetched)) == sorted(f"{loader.mirrors[0]}{f}.gz" for f in data._IDX_FILES)
    assert f"Dataset '{name}' is not in {root.resolve()}: downloading it once" in capsys.readouterr().err
    # present now: a new process (empty cache) reads the files without asking the network
    monkeypatch.setattr(data, "_CACHE", {})
    n_calls = len(calls)
    assert len(load_dataset(name, root, download=True)) == 30
    assert len(calls) == n_calls


def test_auto_download_cifar10_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    written = write_cifar10(tmp_path / "source", per_batch=2, n_test=3)
    body = tar_gz_folder(tmp_path / "source" / "cifar-10-batches-py", tmp_path / "cifar.tar.gz")
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", hashlib.md5(body).hexdigest())
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({tvd.CIFAR10.url: body}, calls))
    train = load_dataset("cifar10", tmp_path / "data", download="auto")
    np.testing.assert_array_equal(train.images.numpy(), written["train_images"])
    test = load_dataset("cifar10", tmp_path / "data", train=False, download="auto")
    np.testing.assert_array_equal(test.labels, written["test_labels"])
    assert set(calls) == {tvd.CIFAR10.url}


def test_corrupted_download_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    """A download whose md5 is not the archive's stops with one clear error; nothing is loaded."""
    write_cifar10(tmp_path / "source", per_batch=1, n_test=1)
    body = tar_gz_folder(tmp_path / "source" / "cifar-10-batches-py", tmp_path / "cifar.tar.gz")
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({tvd.CIFAR10.url: body}, []))
    with pytest.raises(DatasetMissingError, match=r"the download failed: File not found or corrupted"):
        load_dataset("cifar10", tmp_path / "data", download=True)


@pytest.mark.parametrize(
    "name, host",
    [("cifar10", "www.cs.toronto.edu"), ("mnist", "ossci-datasets.s3.amazonaws.com or yann.lecun.com")],
)
def test_no_network_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None, name: str, host: str
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({}, []))
    root = (tmp_path / "data").resolve()
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset(name, root, download="auto")
    message = str(caught.value)
    assert message.startswith(
        f"Dataset '{name}' not found (no network: could not reach {host}: "
        "<urlopen error [Errno -2] Name or service not known>). Looked for"
    )
    assert f"  - run again where {host} is reachable: the download goes into {root}" in message
    assert "  - put the files there yourself, in this layout:" in message
    assert all(f"\n  {path}\n" in message for path in data.expected_files(name, root))


def test_download_false_never_asks_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen({}, calls))
    with pytest.raises(DatasetMissingError, match=r"not found \(download is off\)"):
        load_dataset("cifar10", tmp_path, download=False)
    assert calls == []


def test_celeba_without_gdown_gives_the_manual_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gdown", None)  # import gdown -> ImportError
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset("celeba", tmp_path, download="auto")
    message = str(caught.value)
    assert "(the download failed: the Python package `gdown` is not installed (pip install gdown))" in message
    assert (
        f"download by hand from {data.CELEBA_PAGE}" in message
        and "img_align_celeba.zip (unzip it)" in message
    )


@pytest.mark.parametrize(
    "given, mode",
    [(True, True), (False, False), ("auto", "auto"), ("true", True), ("False", False), (" AUTO ", "auto")],
)
def test_download_mode(given: object, mode: object) -> None:
    assert data.download_mode(given) == mode


def test_download_mode_rejects_others() -> None:
    with pytest.raises(ValueError, match="download must be true, false or \"auto\", got 'sometimes'"):
        data.download_mode("sometimes")


def test_data_command_fetches_or_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: None, capsys: pytest.CaptureFixture
) -> None:
    from prism_flwr import cli

    assert cli.main(["data", "mnist", "--data-dir", str(tmp_path / "a"), "--download", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Dataset 'mnist' not found (download is off).") and "Traceback" not in err
    _serve_mnist(tmp_path, monkeypatch, tvd.MNIST)
    assert cli.main(["data", "mnist", "--data-dir", str(tmp_path / "b")]) == 0  # --download auto by default
    assert "mnist: 30 training images (1, 32, 32) ready in" in capsys.readouterr().out


def test_rows_read_in_chunks_are_the_whole_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prism_flwr.data import idx

    write_mnist(tmp_path, "MNIST", n_train=50, n_test=5)
    raw = tmp_path / "MNIST" / "raw"
    whole = idx.idx_images(raw, True)
    monkeypatch.setattr(idx, "RESIZE_CHUNK", 7)  # several chunks, the last one short
    rows = np.array([49, 3, 3, 20, 0, 8, 9, 10, 11, 12, 13, 14, 48])
    assert torch.equal(idx.idx_images(raw, True, rows), whole[torch.as_tensor(rows)])
    assert torch.equal(idx.idx_images(raw, True), whole)
