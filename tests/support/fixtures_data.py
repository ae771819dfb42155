"""Tiny datasets written in the official on-disk formats, for torchvision's real loaders.

No network here, so MNIST, CIFAR-10 and CelebA are faked: the bytes follow the original files'
layouts (idx headers, Python 2 pickles, annotation text columns) so that the same code path reads
users' real copies.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_SIZE = (178, 218)  # width, height of img_align_celeba JPEGs
CELEBA_ATTRS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
MALE = CELEBA_ATTRS.index("Male")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian uint32 sizes, uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


class _Py2Pickler(pickle._Pickler):
    """Pickles str and bytes as Python 2's str (BINSTRING), as cPickle did for the CIFAR batches.

    Loading then gives b'data' keys with encoding='bytes' and 'data' with encoding='latin1'
    (torchvision), exactly as with the official files.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta.

    Each batch: {'batch_label', 'labels': list of int, 'data': uint8 (N, 3072) as R, G, B planes of
    32x32 row-major, 'filenames'}. Image k is one constant colour. Returns the CHW arrays written.
    """
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    arrays: dict[str, list[np.ndarray]] = {}
    batches = [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]
    for file, n in batches:
        colours = rng.integers(0, 256, (n, 3), dtype=np.uint8)
        images = np.broadcast_to(colours[:, :, None, None], (n, 3, 32, 32)).copy()
        labels = rng.integers(0, 10, n).tolist()
        _py2_pickle(
            base / file,
            {
                "batch_label": f"{'testing' if file == 'test_batch' else 'training'} batch 1 of 1",
                "labels": labels,
                "data": images.reshape(n, 3072),
                "filenames": [f"fixture_{file}_{i}.png" for i in range(n)],
            },
        )
        split = "test" if file == "test_batch" else "train"
        arrays.setdefault(f"{split}_images", []).append(images)
        arrays.setdefault(f"{split}_labels", []).append(np.asarray(labels))
    _py2_pickle(
        base / "batches.meta",
        {
            "num_cases_per_batch": per_batch,
            "label_names": [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],
            "num_vis": 3072,
        },
    )
    return {key: np.concatenate(value) for key, value in arrays.items()}


def write_celeba(root: Path, partitions: list[int], male: list[int], centre_green: list[int]) -> None:
    """<root>/celeba/: img_align_celeba/NNNNNN.jpg (178x218) and the five annotation files.

    Image i is green ``centre_green[i]`` inside the central 160x160 square that CenterCrop(160)
    keeps (left 9, top 29) and red outside it. ``partitions``: 0 train, 1 valid, 2 test.
    """
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    width, height = CELEBA_SIZE
    left, top = (width - 160) // 2, (height - 160) // 2
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name, green in zip(names, centre_green):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:, :, 0] = 220
        pixels[top : top + 160, left : left + 160] = (0, green, 0)
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, quality=95, subsampling=0)
    count = f"{len(names)}\n"
    attrs = [np.where(np.arange(len(CELEBA_ATTRS)) % 3 == 0, 1, -1) for _ in names]
    for row, is_male in zip(attrs, male):
        row[MALE] = 1 if is_male else -1
    texts = {
        "list_eval_partition.txt": "".join(f"{n} {p}\n" for n, p in zip(names, partitions)),
        "identity_CelebA.txt": "".join(f"{n} {2880 + i}\n" for i, n in enumerate(names)),
        "list_attr_celeba.txt": count
        + " ".join(CELEBA_ATTRS)
        + " \n"  # the official header ends with a space
        + "".join(n + "".join(f"{v:3d}" for v in row) + "\n" for n, row in zip(names, attrs)),
        "list_bbox_celeba.txt": count
        + "image_id x_1 y_1 width height\n"
        + "".join(f"{n}{95:6d}{71:4d}{226:4d}{313:4d}\n" for n in names),
        "list_landmarks_align_celeba.txt": count
        + "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
        + "".join(
            f"{n} 69" + "".join(f"{v:5d}" for v in (109, 106, 113, 77, 142, 73, 152, 108, 154)) + "\n"
            for n in names
        ),
    }
    for file, text in texts.items():
        (base / file).write_text(text)


def gzip_file(source: Path, target: Path) -> bytes:
    """``target`` = gzip of ``source`` (as the MNIST mirrors serve the idx files); returns its bytes."""
    import gzip

    target.write_bytes(gzip.compress(source.read_bytes(), mtime=0))
    return target.read_bytes()


def tar_gz_folder(folder: Path, target: Path) -> bytes:
    """``target`` = a .tar.gz holding ``folder`` under its own name (as CIFAR-10's archive); its bytes."""
    import tarfile

    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return target.read_bytes()


class FakeResponse:
    """What ``urllib.request.urlopen`` returns, enough for torchvision's download helpers."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.length, self._body, self._pos = url, len(body), body, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._body) if size < 0 else self._pos + size
        chunk, self._pos = self._body[self._pos : end], min(end, len(self._body))
        return chunk

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def fake_urlopen(files: dict[str, bytes], calls: list[str]):
    """A stand-in for ``urllib.request.urlopen`` serving ``files`` by URL; records every URL asked.

    An unknown URL raises ``URLError`` as a machine without a network would.
    """
    import urllib.error

    def urlopen(request, *args, **kwargs):
        url = getattr(request, "full_url", request)
        calls.append(url)
        if url not in files:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return FakeResponse(url, files[url])

    return urlopen
