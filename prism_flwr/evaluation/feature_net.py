"""Feature networks for the Fréchet distance and precision/recall/density/coverage.

``InceptionFeatures`` (metric "FID"): torchvision's Inception-V3 from a local weights file, with
clean-fid's preprocessing. ``ClassifierFeatures`` (metric "FD-<DATASET>-CNN", never "FID"): the
128-d penultimate features of a small CNN trained on the dataset's real training split, once per
(dataset, seed), cached under ``<data_dir>/feature-nets/`` with its test accuracy. Preprocessing
and caveats: docs/algorithm.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prism_flwr.data.datasets import NUM_CHANNELS, NUM_CLASSES, load_dataset
from prism_flwr.progress import Progress

CNN_FEATURES = 128
INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the uint8 levels 0..255 (as float) a saved PNG would hold."""
    return ((x + 1.0) * 127.5).round_().clamp_(0.0, 255.0)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class SmallCNN(nn.Module):
    """Three conv blocks (conv3x3-BN-ReLU-maxpool: 32 -> 16 -> 8 -> 4) and a 128-unit hidden layer.

    About 2.7 M multiply-adds per 32x32 grey image: two epochs of Fashion-MNIST take about 45 s on
    two CPU cores and reach about 90.7% test accuracy (seed 0).
    """

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        blocks = []
        for cin, cout in ((in_ch, 16), (16, 32), (32, 64)):
            blocks += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(
            *blocks, nn.Flatten(), nn.Linear(64 * 4 * 4, CNN_FEATURES), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(CNN_FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ClassifierFeatures(nn.Module):
    """Penultimate activations of a trained ``SmallCNN`` (frozen, eval mode)."""

    num_features = CNN_FEATURES

    def __init__(self, cnn: SmallCNN, dataset: str, ident: str) -> None:
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)
        self.metric_name = f"FD-{dataset.upper()}-CNN"
        self.ident = ident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(quantize(x) / 127.5 - 1.0)


class InceptionFeatures(nn.Module):
    """2048-d pool features of torchvision's Inception-V3 (preprocessing in the module docstring)."""

    num_features = INCEPTION_FEATURES
    metric_name = "FID"

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inception-weights: no file at {path}. Give the path of torchvision's Inception-V3 ImageNet "
                f"checkpoint (inception_v3_google-0cc3c7bd.pth); nothing is downloaded at run time."
            )
        # init_weights=False: the random init (scipy truncnorm, slow) is overwritten by the file anyway.
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()  # the forward then ends at the 2048-d average pool (dropout is off in eval)
        self.net = net.eval().requires_grad_(False)
        self.ident = f"inception-{_file_digest(path)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = quantize(x) / 255.0
        if v.shape[1] == 1:
            v = v.expand(-1, 3, -1, -1)
        v = F.interpolate(
            v, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic", align_corners=False, antialias=True
        )
        return self.net(2.0 * v - 1.0)


def classifier_path(data_dir: str | Path, dataset: str, seed: int) -> Path:
    return Path(data_dir).expanduser().resolve() / "feature-nets" / f"{dataset}-cnn-seed{seed}.pt"


def atomic_write(path: Path, write) -> None:
    """Write through a private temporary file renamed into place (several processes may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@torch.no_grad()
def _accuracy(
    cnn: SmallCNN, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch: int = 1000
) -> float:
    cnn.eval()
    correct = sum(
        (cnn(images[i : i + batch].to(device)).argmax(1).cpu() == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return correct / len(images)


def train_classifier(
    dataset: str,
    data_dir: str | Path,
    seed: int = 0,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    download: bool = False,
    train_images: int | None = None,
) -> tuple[SmallCNN, dict]:
    """Train ``SmallCNN`` on the real training split; returns it and its info (test accuracy, seconds).

    Adam with a one-cycle learning-rate schedule (peak ``lr``), cross-entropy, no augmentation.
    Images are the dataset's preprocessed uint8 pixels mapped to [-1, 1]. ``train_images``: train
    on that many images of the split (the first of a permutation seeded by ``seed``), else all.
    """
    device = torch.device(device)
    train, test = (load_dataset(dataset, data_dir, train=t, download=download) for t in (True, False))
    subset = None
    if train_images is not None:
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_images]
    x_train = train.to_float(subset)
    y_train = torch.from_numpy(train.labels)[subset if subset is not None else slice(None)]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cnn = SmallCNN(NUM_CHANNELS[dataset], NUM_CLASSES[dataset]).to(device)
    opt = torch.optim.Adam(cnn.parameters(), lr=lr)
    steps_per_epoch = (
        len(x_train) // batch_size
    )  # drop the ragged last batch: BatchNorm dislikes tiny batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    progress = Progress(f"{dataset} feature classifier", epochs * steps_per_epoch, "steps")
    for epoch in range(epochs):
        cnn.train()
        order = torch.randperm(len(x_train), generator=gen)
        for b in range(steps_per_epoch):
            progress.update(epoch * steps_per_epoch + b, f"epoch {epoch + 1}/{epochs}")
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(cnn(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.time() - t0
    progress.close()
    acc = _accuracy(cnn, test.to_float(), torch.from_numpy(test.labels), device)
    info = {
        "dataset": dataset,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "test_accuracy": acc,
        "train_seconds": round(seconds, 1),
        "train_images": len(x_train),
        "test_images": len(test),
        "features": CNN_FEATURES,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return cnn.cpu().eval(), info


def load_or_train_classifier(
    dataset: str,
    data_dir: str | Path,
    seed: int = 0,
    device: torch.device | str = "cpu",
    download: bool = False,
    force: bool = False,
    *,
    epochs: int = 2,
    train_images: int | None = None,
) -> tuple[SmallCNN, dict, Path]:
    """The cached classifier for (dataset, seed), trained and saved first when missing (or ``force``).

    ``epochs`` and ``train_images`` (see ``train_classifier``) apply to that training only: a cached
    classifier is used as it is, and its info records the size it was trained at.
    """
    path = classifier_path(data_dir, dataset, seed)
    if path.is_file() and not force:
        cnn = SmallCNN(NUM_CHANNELS[dataset], NUM_CLASSES[dataset])
        cnn.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return cnn.eval(), json.loads(path.with_suffix(".json").read_text()), path
    print(f"training the {dataset} feature classifier (seed {seed}; once, cached at {path}) ...", flush=True)
    cnn, info = train_classifier(
        dataset, data_dir, seed, epochs, device=device, download=download, train_images=train_images
    )
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    atomic_write(path, lambda tmp: torch.save(cnn.state_dict(), tmp))
    print(
        f"{dataset} feature classifier: test accuracy {info['test_accuracy']:.4f} "
        f"after {info['train_seconds']:.0f} s of training",
        flush=True,
    )
    return cnn, info, path


def build_feature_net(
    dataset: str,
    data_dir: str | Path,
    inception_weights: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    download: bool = False,
) -> tuple[nn.Module, dict]:
    """Inception-V3 when ``inception_weights`` is given, else the dataset's cached classifier.

    Returns the feature module (on ``device``) and a description for summaries.
    """
    if inception_weights:
        net = InceptionFeatures(inception_weights)
        info = {"metric": net.metric_name, "network": "inception-v3", "weights": str(inception_weights)}
    else:
        cnn, info, path = load_or_train_classifier(dataset, data_dir, seed, device, download)
        net = ClassifierFeatures(cnn, dataset, f"cnn-seed{seed}-{_file_digest(path)}")
        info = {
            "metric": net.metric_name,
            "network": "small-cnn",
            "weights": str(path),
            "test_accuracy": info["test_accuracy"],
        }
    return net.to(device), info
