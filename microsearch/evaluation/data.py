"""Data sources: CIFAR-10, an ImageFolder tree (decoded once, cached) and a synthetic set.

Every source yields uint8 images (N, 3, 32, 32) and int64 labels. A validation split is held out
of the training images with a fixed seed; the test split is only for the final evaluation.
"""

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class DataError(ValueError):
    """Missing or malformed data; the message says what and where."""


@dataclass
class DataConfig:
    """Which images to use, e.g. ``DataConfig("imagefolder:~/data/cifar10-jpeg")``."""

    source: str = "synthetic"  # cifar10 | imagefolder:PATH | synthetic[:N]
    val_size: int = 5000  # training images held out for validation (model selection)
    seed: int = 0  # fixes the validation split
    cache_dir: str = "~/.cache/microsearch"

    def __post_init__(self) -> None:
        name = self.source.partition(":")[0]
        if name not in SOURCES:
            raise DataError(f"unknown data source {self.source!r}; use one of: {', '.join(SOURCES)}")
        if self.val_size < 0:
            raise DataError(f"val_size must be >= 0, got {self.val_size}")


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)
    # (device, dtype) -> the split normalised on that device (see ``loader.place``)
    placed: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split | None
    classes: list[str]


def _cifar10(arg: str, config: DataConfig) -> tuple[Split, Split | None, list[str]]:
    import torchvision

    root = Path(config.cache_dir).expanduser() / "cifar10"
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=True)
        except Exception as e:  # no network, disk full, corrupt archive
            raise DataError(f"cannot get CIFAR-10 into {root}: {e}") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1], list(ds.classes)


# torchvision's CIFAR10(...).classes (read from the archive's metadata, so written out here)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _list_tree(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        found = f"only the class folder {classes[0]!r}" if classes else "no class folders"
        raise DataError(f"{root} has {found}; a classifier needs two or more ({root}/<class>/<image>.jpg)")
    files = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in _IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"no .jpg/.jpeg/.png images under {root}")
    return classes, files


def _decode_tree(root: Path, cache_dir: Path) -> tuple[Split, list[str]]:
    """Decode every image of ``root/<class>/*`` once; later starts load the cached tensor."""
    classes, files = _list_tree(root)
    stamp = f"{root.resolve()}|{len(files)}|{max(os.stat(f).st_mtime_ns for f, _ in files)}"
    cache = cache_dir / f"imagefolder-{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        return _cached(cache, len(files), classes)

    def decode(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                pixels = np.array(img.convert("RGB"))
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from None
        if pixels.shape[:2] != (32, 32):
            raise DataError(f"image {path} is {pixels.shape[:2]}, expected 32x32")
        return torch.from_numpy(pixels).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = torch.stack(list(pool.map(decode, [f for f, _ in files], chunksize=256)))
    split = Split(images, torch.tensor([label for _, label in files], dtype=torch.int64))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": split.images, "labels": split.labels, "classes": classes}, tmp)
    tmp.replace(cache)
    return split, classes


def _cached(cache: Path, count: int, classes: list[str]) -> tuple[Split, list[str]]:
    """The decoded images of a tree from its cache file, which must hold what the tree holds."""
    try:
        blob = torch.load(cache, weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = images.shape == (count, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (count,)
        ok = ok and blob["classes"] == classes
    except Exception:
        ok = False
    if not ok:
        raise DataError(f"the decoded-image cache {cache} is damaged; delete it and the images are decoded again")
    return Split(images, labels), classes


def _imagefolder(arg: str, config: DataConfig) -> tuple[Split, Split | None, list[str]]:
    if not arg:
        raise DataError("imagefolder needs a path: imagefolder:PATH (PATH/train/<class>/*.jpg)")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder path {root} does not exist or is not a folder")
    cache_dir = Path(config.cache_dir).expanduser()
    train_root = root / "train" if (root / "train").is_dir() else root
    train, classes = _decode_tree(train_root, cache_dir)
    test = None
    if (root / "test").is_dir():
        test, test_classes = _decode_tree(root / "test", cache_dir)
        if test_classes != classes:
            raise DataError(f"{root}/test classes {test_classes} differ from train {classes}")
    return train, test, classes


def synthetic_images(n: int, seed: int) -> Split:
    """A seeded 10-class set: smooth colour patterns, blended with another class, shifted, noised.

    A ResNet-20 learns it well above chance in a few epochs on the CPU, while narrow nets lag
    behind, so a search on it separates candidates. The class patterns are the same for every seed.
    """
    g = torch.Generator().manual_seed(1234)
    prototypes = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bicubic")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    other = torch.randint(0, 10, (n,), generator=g)
    blend = 0.6 * torch.rand(n, 1, 1, 1, generator=g)  # weight of the distracting class
    brightness = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    shifts = torch.randint(-8, 9, (n, 2), generator=g)
    images = ((1 - blend) * prototypes[labels] + blend * prototypes[other]) * brightness
    images = torch.stack([img.roll((int(dy), int(dx)), (1, 2)) for img, (dy, dx) in zip(images, shifts)])
    images = images + 0.5 * torch.randn(images.shape, generator=g)
    return Split((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def _synthetic(arg: str, config: DataConfig) -> tuple[Split, Split | None, list[str]]:
    try:
        n = int(arg) if arg else 10_000
    except ValueError:
        raise DataError(f"synthetic:N needs an integer N, got {arg!r}") from None
    if n < 10:
        raise DataError(f"synthetic:N needs N >= 10, got {n}")
    test = synthetic_images(max(n // 5, 10), seed=2)
    return synthetic_images(n, seed=1), test, [f"class{i}" for i in range(10)]


SOURCES: dict[str, Callable[[str, DataConfig], tuple[Split, Split | None, list[str]]]] = {
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def load_data(config: DataConfig) -> Dataset:
    """Load a source and hold ``config.val_size`` training images out for validation."""
    name, _, arg = config.source.partition(":")
    full, test, classes = SOURCES[name](arg, config)
    if config.val_size >= len(full):
        raise DataError(f"val_size {config.val_size} leaves no training images ({config.source} has {len(full)})")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(config.seed))
    val_idx, train_idx = order[: config.val_size], order[config.val_size :]
    train = Split(full.images[train_idx], full.labels[train_idx])
    val = Split(full.images[val_idx], full.labels[val_idx])
    return Dataset(train, val, test, classes)
