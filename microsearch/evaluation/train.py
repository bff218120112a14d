"""One training loop: SGD (Nesterov), one-cycle or cosine learning rate, label smoothing, mixup."""

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.compression import clamp_binary_weights_
from microsearch.evaluation.data import Dataset, Split
from microsearch.evaluation.loader import DeviceLoader

SCHEDULES = ("onecycle", "cosine")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and at which learning rate."""


@dataclass
class TrainConfig:
    """Hyperparameters of one training run, e.g. ``TrainConfig(epochs=30, cutout=8)``."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4  # applied to conv / linear weights only
    schedule: str = "onecycle"  # onecycle: linear warm-up then linear decay; cosine: warm-up then cosine
    warmup: float = 0.2  # fraction of the steps spent warming up
    label_smoothing: float = 0.1
    mixup: float = 0.0  # alpha of the Beta(alpha, alpha) mixing weight; 0 disables
    crop: int = 4  # random-crop padding in pixels; 0 disables
    flip: bool = True
    cutout: int = 0  # cutout square side in pixels; 0 disables
    tta: bool = False  # evaluate on the image and its mirror (2 forward passes, both scored)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "schedule": self.schedule in SCHEDULES,
            "warmup": 0 <= self.warmup < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "mixup": self.mixup >= 0,
            "crop": self.crop >= 0,
            "cutout": 0 <= self.cutout <= 32,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig.{bad[0]} has an invalid value {getattr(self, bad[0])!r}")
        resolve_device(self.device)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    lr: float
    seconds: float  # wall time of the run so far
    images_per_second: float  # training throughput of this epoch


@dataclass
class Evaluation:
    accuracy: float
    passes: int  # forward passes per image (2 with flip TTA); the score multiplies ops by it
    images: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A readable name of the device, recorded with every result."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate at ``step`` of ``total``: a pure function of the step."""
    warm = int(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if config.schedule == "onecycle":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, tta: bool = False) -> Evaluation:
    """Top-1 accuracy on ``split``; with ``tta`` the logits of the image and its mirror are summed."""
    model.eval()
    correct = torch.zeros((), device=device)
    for x, y in DeviceLoader(split, 1000, device):
        with _autocast(device):
            logits = model(x)
            if tta:
                logits = logits + model(x.flip(3))
        correct += (logits.argmax(1) == y).sum()
    return Evaluation(correct.item() / max(1, len(split)), 2 if tta else 1, len(split))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place on ``data.train``, validating on ``data.val`` after every epoch.

    ``on_epoch`` sees each epoch's stats; it may raise to stop training (a search pruner does).
    Example: ``history = train(model, load_data(DataConfig()), TrainConfig(epochs=3))``.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        data.train,
        config.batch_size,
        device,
        train=True,
        crop=config.crop,
        flip=config.flip,
        cutout=config.cutout,
        seed=config.seed,
    )
    if len(loader) == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train)} training images")
    optimizer = _optimizer(model, config)
    mix = torch.distributions.Beta(config.mixup, config.mixup) if config.mixup > 0 else None
    total, step, start, history = config.epochs * len(loader), 0, time.perf_counter(), []
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for x, y in loader:
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lam = float(mix.sample()) if mix else 1.0
            perm = torch.randperm(len(y), device=device) if mix else None
            x_in = lam * x + (1 - lam) * x[perm] if mix else x
            with _autocast(device):
                logits = model(x_in)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                if mix:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(
                        logits, y[perm], label_smoothing=config.label_smoothing
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clamp_binary_weights_(model)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            step += 1
        mean_loss = loss_sum.item() / len(loader)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} in epoch {epoch} (peak lr {config.lr}); "
                "lower the learning rate or raise the bits"
            )
        seen = len(loader) * config.batch_size
        epoch_seconds = time.perf_counter() - epoch_start
        stats = EpochStats(
            epoch=epoch,
            train_loss=mean_loss,
            train_acc=correct.item() / seen,
            val_acc=evaluate(model, data.val, device, config.tta).accuracy if len(data.val) else float("nan"),
            lr=lr,
            seconds=time.perf_counter() - start,
            images_per_second=seen / epoch_seconds,
        )
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    return history
