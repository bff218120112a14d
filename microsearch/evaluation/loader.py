"""A loader that keeps a whole split on the device and augments in batch there.

A split is placed on a device once (normalised, channels_last, in the training dtype) and cached
on the ``Split`` itself, so every training run and evaluation of a worker reuses it. No per-image
PIL work: crops, flips and cutout are index arithmetic on the device, batches come from a device
``randperm``. Runs the same on CPU and CUDA.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from microsearch.evaluation.data import Split

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PAD_MODES = ("zeros", "reflect")


def place(split: Split, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``split`` on ``device``: normalised, channels_last, ``dtype``; cached."""
    key = (str(device), dtype)
    if key not in split.placed:
        mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        images = ((split.images.to(device).float() - mean) / std).to(dtype)
        split.placed[key] = (images.contiguous(memory_format=torch.channels_last), split.labels.to(device))
    return split.placed[key]


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Per-sample random crop of a (B, C, H, W) batch after padding by ``padding`` pixels
    (``zeros``: the mean colour of normalised images; ``reflect``: mirrored borders)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4) if mode == "zeros" else F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=gen)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a (B, C, H, W) batch where the boolean ``flip`` (B,) is set."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each image (DeVries & Taylor 2017)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x * ~inside[:, None]


class DeviceLoader:
    """Batches of normalised images from a split placed on ``device`` in ``dtype``.

    ``alternate_flip``: each image is mirrored in every other epoch (a random half in the first
    epoch, the other half in the second, ...), so both views are seen equally often (airbench).
    Example: ``for x, y in DeviceLoader(data.train, 256, device, train=True, crop=4): ...``
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        train: bool = False,
        crop: int = 0,  # padding in pixels for the random crop (translation); 0 disables
        pad_mode: str = "zeros",  # zeros | reflect
        flip: bool = False,
        alternate_flip: bool = False,
        cutout: int = 0,  # side of the cutout square in pixels; 0 disables
        seed: int = 0,
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.images, self.labels = place(split, device, dtype)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.crop, self.pad_mode, self.flip, self.cutout = crop, pad_mode, flip, cutout
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.flip_half = (
            torch.rand(len(self.labels), device=device, generator=self.gen) < 0.5 if alternate_flip else None
        )
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:  # shuffled, last partial batch dropped so every step has the same size
            order = torch.randperm(n, device=self.device, generator=self.gen)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train and self.crop:
                x = random_crop(x, self.crop, self.gen, self.pad_mode)
            if self.train and self.flip:
                if self.flip_half is not None:
                    flip = self.flip_half[idx] ^ bool(self.epoch % 2)
                else:
                    flip = torch.rand(len(idx), device=self.device, generator=self.gen) < 0.5
                x = flip_where(x, flip)
            if self.train and self.cutout:
                x = cutout(x, self.cutout, self.gen)
            yield x.contiguous(memory_format=torch.channels_last), self.labels[idx]
        self.epoch += 1


def sample_images(split: Split, device: torch.device, n: int = 256) -> torch.Tensor:
    """The first ``n`` images of ``split``, normalised, unaugmented (e.g. ThiNet's activations)."""
    return next(iter(DeviceLoader(split, n, device)))[0]
