"""The paper's image datasets, read from a local directory: MNIST and Fashion-MNIST's idx files
(``idx.py``) and CIFAR-10's batches (``cifar.py``) directly, CelebA by torchvision's own class.

Every dataset comes back as one ``ImageData``: uint8 images of shape (N, C, 32, 32), already
preprocessed as in the paper (MNIST/Fashion-MNIST resized 28 -> 32, CelebA centre-cropped to 160
and resized to 32, CIFAR-10 as is), and int64 labels. ``to_float`` maps pixels to [-1, 1].
Fashion-MNIST is taken from the Debian package ``dataset-fashion-mnist`` when the data directory
lacks it. Otherwise a missing dataset is fetched once with torchvision's own download (its
progress bar on stderr; checksums of the downloaded archives checked) when ``download`` is
``"auto"`` (the default) or ``True``; with ``download=False``, or when the download fails (no
network, Google Drive refusing CelebA, ``gdown`` missing), ``DatasetMissingError`` says why, where
we looked and how to put the files in place by hand. Files already present are never fetched again.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from prism_flwr.data.cifar import cifar_images, cifar_labels
from prism_flwr.data.fetching import download_lock as _download_lock
from prism_flwr.data.fetching import no_network as _no_network
from prism_flwr.data.fetching import socket_timeout as _socket_timeout
from prism_flwr.data.idx import idx_images, idx_labels
from prism_flwr.data.images import to_float
from prism_flwr.progress import Progress

DATASETS = ("mnist", "fmnist", "cifar10", "celeba")
NUM_CHANNELS = {"mnist": 1, "fmnist": 1, "cifar10": 3, "celeba": 3}
NUM_CLASSES = {"mnist": 10, "fmnist": 10, "cifar10": 10, "celeba": 2}
IMAGE_SIZE = 32
CELEBA_CROP = 160
# Where Debian's `dataset-fashion-mnist` installs the four idx files (gzipped).
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# torchvision's MNIST and FashionMNIST need all four uncompressed files, whichever split is loaded.
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# torchvision looks under <root>/<class name>/raw/.
_IDX_FOLDER = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
# The files torchvision's CIFAR10 and CelebA loaders read, written out so that naming them (the
# client cache's key) imports no torchvision; tests/test_data.py checks them against torchvision.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CELEBA_FOLDER = "celeba"
CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
                "list_landmarks_align_celeba.txt", "list_eval_partition.txt")  # fmt: skip
DOWNLOAD_TIMEOUT = 60.0  # seconds without an answer before a download counts as "no network"
# Approximate download sizes, for the message printed before fetching.
DOWNLOAD_SIZES = {"mnist": "12 MB", "fmnist": "30 MB", "cifar10": "170 MB", "celeba": "1.4 GB"}
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not in the data directory and could not (or may not) be downloaded."""


def download_mode(download: bool | str) -> bool | str:
    """``True``, ``False`` or ``"auto"`` (also from the strings "true"/"false"); else ``ValueError``."""
    if isinstance(download, bool):
        return download
    value = str(download).strip().lower()
    if value in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(value, "auto")
    raise ValueError(f'download must be true, false or "auto", got {download!r}')


@dataclass(frozen=True, eq=False)  # eq=False: compare and hash by identity, never element-wise
class ImageData:
    """One split of a dataset, preprocessed and kept as uint8 to save memory."""

    name: str
    images: torch.Tensor  # uint8 (N, C, 32, 32)
    labels: np.ndarray  # int64 (N,); CelebA: the 'Male' attribute as 0/1
    num_classes: int

    def __post_init__(self) -> None:
        shape = (NUM_CHANNELS[self.name], IMAGE_SIZE, IMAGE_SIZE)
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != shape:
            raise ValueError(
                f"{self.name}: expected uint8 images (N, {NUM_CHANNELS[self.name]}, 32, 32), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(
                f"{self.name}: expected int64 labels ({len(self.images)},), "
                f"got {self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def to_float(self, idx: np.ndarray | torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """float32 images in [-1, 1] (x / 127.5 - 1), all of them or those at ``idx``."""
        return to_float(self.images if idx is None else self.images[torch.as_tensor(idx, dtype=torch.long)])


# torchvision checks the md5 of every CIFAR-10 and CelebA file before loading. Re-packaged copies
# (batches re-pickled, text files re-saved) and our test fixtures hold the same data in the same
# formats with other bytes, so offline we only check that the files exist. A download
# (download=True) still verifies the md5 of what torchvision fetches: these classes keep the md5s
# of the archives (CIFAR-10's tgz_md5) and of the downloaded files (CelebA's file_list).
#
# torchvision is imported on first use (``_tvd``): it costs about 1 s and 160 MB, a ClientApp
# process of Flower's deployment engine (one per message) that finds its images in the client
# cache (client_cache.py) never needs it, and an MNIST/Fashion-MNIST node never does.
def _tvd():
    from torchvision import datasets

    return datasets


@cache
def _cifar10_class() -> type:
    tvd = _tvd()

    class _CIFAR10(tvd.CIFAR10):
        train_list = [[file, None] for file, _ in tvd.CIFAR10.train_list]
        test_list = [[file, None] for file, _ in tvd.CIFAR10.test_list]
        meta = {**tvd.CIFAR10.meta, "md5": None}

    return _CIFAR10


@cache
def _celeba_class() -> type:
    class _CelebA(_tvd().CelebA):
        def _check_integrity(self) -> bool:
            return all(path.exists() for path in expected_files("celeba", Path(self.root)))

    return _CelebA


def expected_files(name: str, root: Path) -> list[Path]:
    """Every file (and CelebA's image folder) torchvision's loader needs under ``root``."""
    if name in _IDX_FOLDER:
        return [root / _IDX_FOLDER[name] / "raw" / file for file in _IDX_FILES]
    if name == "cifar10":
        return [root / CIFAR10_FOLDER / file for file in CIFAR10_FILES]
    base = root / CELEBA_FOLDER
    return [base / "img_align_celeba", *(base / file for file in CELEBA_FILES)]


def _layout(name: str, root: Path) -> str:
    """The directory layout torchvision expects, for the error message."""
    if name in _IDX_FOLDER:
        return f"{root / _IDX_FOLDER[name] / 'raw'}/{', '.join(_IDX_FILES)}  (uncompressed idx files)"
    if name == "cifar10":
        return (
            f"{root / 'cifar-10-batches-py'}/data_batch_1..5, test_batch, batches.meta"
            "  (the 'CIFAR-10 python version' archive, extracted)"
        )
    return (
        f"{root / 'celeba'}/img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt, "
        "identity_CelebA.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt"
        "  (the aligned-and-cropped JPEGs and the five annotation files)"
    )


def _missing_message(name: str, root: Path, missing: list[Path], why: str = "download is off") -> str:
    looked = [str(path) for path in missing]
    if name == "fmnist":
        looked += [
            str(FMNIST_SYSTEM_DIR / f"{file}.gz")
            for file in _IDX_FILES
            if not (FMNIST_SYSTEM_DIR / f"{file}.gz").is_file()
        ]
    if why == "download is off":
        ways = [
            f'set run-config key `download` to "auto" (the default) on a machine with internet '
            f"(flwr run . --run-config 'download=\"auto\"'); torchvision downloads it once into {root}"
        ]
    else:
        ways = [f"run again where {_host(name)} is reachable: the download goes into {root}"]
    if name == "celeba":
        ways[0] += (
            " (from Google Drive: needs the `gdown` package, pip install gdown; Google Drive often "
            "refuses it for a day once its quota is spent)"
        )
        ways.append(
            f"download by hand from {CELEBA_PAGE} (Google Drive or Baidu links): "
            "'Align&Cropped Images' img_align_celeba.zip (unzip it) and the files of 'Anno' and 'Eval'"
        )
    ways.append(
        f"put the files there yourself, in this layout:\n      {_layout(name, root)}\n"
        "    or set run-config key `data-dir` to a directory with this layout"
    )
    if name == "fmnist":
        ways.append(
            f"apt-get install dataset-fashion-mnist (Debian/Ubuntu); its files in {FMNIST_SYSTEM_DIR} "
            "are then used automatically"
        )
    return "\n".join(
        [
            f"Dataset '{name}' not found ({why}). Looked for these files, missing:",
            *(f"  {path}" for path in looked),
            "Get it in one of these ways:",
            *(f"  - {way}" for way in ways),
        ]
    )


def _urls(name: str) -> list[str]:
    tvd = _tvd()
    if name in _IDX_FOLDER:
        loader = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        return [f"{mirror}{file}" for mirror in loader.mirrors for file, _ in loader.resources]
    if name == "cifar10":
        return [tvd.CIFAR10.url]
    return ["https://drive.google.com/"]


def _host(name: str) -> str:
    return " or ".join(dict.fromkeys(urllib.parse.urlsplit(url).netloc for url in _urls(name)))


def _torchvision_download(name: str, root: Path) -> None:
    """torchvision's download of the whole dataset (both splits) into ``root``."""
    tvd = _tvd()
    if name in _IDX_FOLDER:
        (tvd.MNIST if name == "mnist" else tvd.FashionMNIST)(root, train=True, download=True)
    elif name == "cifar10":
        _cifar10_class()(root, train=True, download=True)
    else:
        try:
            import gdown  # noqa: F401  torchvision's CelebA download needs it
        except ImportError:
            raise RuntimeError("the Python package `gdown` is not installed (pip install gdown)") from None
        tvd.CelebA(root, split="all", download=True)


def fetch(name: str, root: Path) -> None:
    """Download ``name`` into ``root`` once (missing files only); ``DatasetMissingError`` on failure."""
    with _download_lock(root, name):
        missing = [path for path in expected_files(name, root) if not path.exists()]
        if not missing:  # another process fetched it while we waited for the lock
            return
        print(
            f"Dataset '{name}' is not in {root}: downloading it once (about {DOWNLOAD_SIZES[name]}) "
            f"from {_host(name)} ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT):
                _torchvision_download(name, root)
        except Exception as err:  # noqa: BLE001  every failure becomes one clear message
            lines = str(err).splitlines() or [err.__class__.__name__]
            detail = next(
                (line for line in lines if "urlopen error" in line or "timed out" in line), lines[0]
            )
            why = (
                f"no network: could not reach {_host(name)}: {detail}"
                if _no_network(err)
                else f"the download failed: {detail}"
            )
            missing = [path for path in expected_files(name, root) if not path.exists()]
            raise DatasetMissingError(_missing_message(name, root, missing, why)) from err
        missing = [path for path in expected_files(name, root) if not path.exists()]
        if missing:
            raise DatasetMissingError(
                _missing_message(name, root, missing, "the download left files missing")
            )
        print(f"Dataset '{name}' downloaded into {root}", file=sys.stderr, flush=True)


def _prepare_fmnist(root: Path) -> None:
    """Gunzip Debian's Fashion-MNIST into torchvision's layout for the idx files ``root`` lacks.

    The package re-compressed the .gz files, so their md5 differs from what torchvision's
    downloader expects; the uncompressed idx files are what its loader reads, and it only checks
    that they exist.
    """
    raw = root / _IDX_FOLDER["fmnist"] / "raw"
    for file in _IDX_FILES:
        source, target = FMNIST_SYSTEM_DIR / f"{file}.gz", raw / file
        if target.is_file() or not source.is_file():
            continue
        raw.mkdir(parents=True, exist_ok=True)
        # A private temporary file renamed into place: several processes (e.g. Ray workers
        # hosting simulated clients) may prepare the same directory at the same time.
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{file}.")
        try:
            with gzip.open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _load_celeba(root: Path, train: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Centre-crop 160 then resize to 32, image by image through PIL, as in the paper."""
    from torchvision import transforms as T

    transform = T.Compose([T.CenterCrop(CELEBA_CROP), T.Resize(IMAGE_SIZE), T.PILToTensor()])
    dataset = _celeba_class()(
        root, split="train" if train else "test", target_type="attr", transform=transform
    )
    progress = Progress(
        f"celeba {'train' if train else 'test'} split: centre-crop and resize", len(dataset), "images"
    )
    images = []
    for i in range(len(dataset)):
        progress.update(i)
        images.append(dataset[i][0])
    progress.close()
    images = torch.stack(images)
    labels = dataset.attr[:, dataset.attr_names.index("Male")].numpy()
    return images, labels


def _ensure(name: str, root: Path, download: bool | str) -> None:
    """The dataset's files in ``root``: prepared from Debian's package, or fetched when allowed."""
    if name == "fmnist":
        _prepare_fmnist(root)
    missing = [path for path in expected_files(name, root) if not path.exists()]
    if missing:
        if download_mode(download) is False:
            raise DatasetMissingError(_missing_message(name, root, missing))
        fetch(name, root)


def _load(name: str, root: Path, train: bool, download: bool | str) -> ImageData:
    _ensure(name, root, download)
    if name == "cifar10":
        images, labels = (
            cifar_images(root / CIFAR10_FOLDER, train),
            cifar_labels(root / CIFAR10_FOLDER, train),
        )
    elif name == "celeba":
        images, labels = _load_celeba(root, train)
    else:
        raw = root / _IDX_FOLDER[name] / "raw"
        images, labels = idx_images(raw, train), idx_labels(raw, train)
    return ImageData(name, images, labels.astype(np.int64), NUM_CLASSES[name])


_CACHE: dict[tuple[str, Path, bool], ImageData] = {}


def load_dataset(
    name: str, data_dir: str | os.PathLike = "data", train: bool = True, download: bool | str = False
) -> ImageData:
    """Load one split of ``name`` from ``data_dir``, once per process.

    Cached by (name, resolved data_dir, train): every simulated client a process hosts shares the
    same tensors. Missing files are downloaded once with ``download`` ``"auto"`` or ``True``;
    ``DatasetMissingError`` when that is off or fails.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser().resolve()
    key = (name, root, train)
    if key not in _CACHE:
        _CACHE[key] = _load(name, root, train, download)
    return _CACHE[key]


def load_labels(name: str, data_dir: str | os.PathLike, download: bool | str = False) -> np.ndarray:
    """The training split's labels: MNIST/Fashion-MNIST's label file alone (60 kB), CIFAR-10's
    batches one at a time, unless the whole split is loaded in this process already; CelebA
    through ``load_dataset``."""
    root = Path(data_dir).expanduser().resolve()
    if name == "celeba" or (name, root, True) in _CACHE:
        return load_dataset(name, root, True, download).labels
    _ensure(name, root, download)
    if name == "cifar10":
        return cifar_labels(root / CIFAR10_FOLDER, True)
    return idx_labels(root / _IDX_FOLDER[name] / "raw", True)


def load_rows(
    name: str, data_dir: str | os.PathLike, rows: np.ndarray, download: bool | str = False
) -> torch.Tensor:
    """The training split's uint8 images at ``rows`` (N, C, 32, 32): for MNIST/Fashion-MNIST read
    and resized for those rows alone, for CIFAR-10 kept from one batch at a time (the same pixels
    as from the whole split), unless the whole split is loaded in this process already; CelebA
    through ``load_dataset``."""
    root = Path(data_dir).expanduser().resolve()
    if name == "celeba" or (name, root, True) in _CACHE:
        return load_dataset(name, root, True, download).images[torch.as_tensor(rows, dtype=torch.long)]
    _ensure(name, root, download)
    if name == "cifar10":
        return cifar_images(root / CIFAR10_FOLDER, True, rows)
    return idx_images(root / _IDX_FOLDER[name] / "raw", True, rows)
