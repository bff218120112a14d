"""A loader that keeps a whole split on the device as uint8 and augments in batch there.

No per-image PIL work: crops, flips and cutout are index arithmetic on the device, batches come
from a device ``randperm``. Runs the same on CPU and CUDA.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from microsearch.evaluation.data import Split

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a (B, C, H, W) batch after zero padding by ``padding`` pixels."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=gen)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
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
    """Batches of normalised float images from a split held on ``device``.

    Example: ``for x, y in DeviceLoader(data.train, 256, device, train=True, crop=4): ...``
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        train: bool = False,
        crop: int = 0,  # padding in pixels for the random crop; 0 disables
        flip: bool = False,
        cutout: int = 0,  # side of the cutout square in pixels; 0 disables
        seed: int = 0,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.crop, self.flip, self.cutout = crop, flip, cutout
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = device.type == "cuda"

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
                x = random_crop(x, self.crop, self.gen)
            if self.train and self.flip:
                x = random_flip(x, self.gen)
            x = (x.float() - self.mean) / self.std
            if self.train and self.cutout:
                x = cutout(x, self.cutout, self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
