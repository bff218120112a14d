"""One training loop: SGD (Nesterov), one-cycle or cosine learning rate, label smoothing, mixup,
distillation from a teacher network.

Every device trains at the precision its hardware runs natively (``precision="auto"``: bf16
autocast on CUDA GPUs with bf16 and on CPUs with AVX512-BF16 or AMX, float32 elsewhere), always
channels_last. Quantized layers stay exact in every precision (see ``compression/_quant.py``), so
precision is a training choice, recorded with every result, not a property of the audited model.
The step runs compiled where that pays off (``compile="auto"``, see ``COMPILE_MIN_STEPS``).
"""

import copy
import math
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.compression import (
    calibrate_,
    calibrated,
    install_training_hooks,
    learned_quantizers,
    set_quantization_,
)
from microsearch.evaluation.data import Dataset, Split
from microsearch.evaluation.loader import PAD_MODES, DeviceLoader

SCHEDULES = ("onecycle", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE = ("auto", "on", "off")
# torch.compile fuses elementwise chains (the quantizers'; BatchNorm, ReLU, additions). On 2 CPU cores
# (benchmarks/trial_speed.py, medians of three interleaved rounds) it makes a 4/4-bit ResNet-20 step
# 2.1x faster (393 -> 810 images/s at batch 256 on AMD EPYC: 0.33 s saved per step) for ~70 s of
# compilation with a cold cache, which pays back after ~220 steps. What a float model gains depends
# on the CPU: 7-16% on AMD EPYC (893 -> 952 and 802 -> 931 in two runs, repaying ~45 s of
# compilation after ~2,500 and ~1,000 steps), 26% on an Intel Xeon with AMX, where the convolutions
# are fast and the elementwise work is what is left (580 -> 732; 90 s repaid after ~1,000 steps).
# So "auto" compiles models with learned-step quantizers for runs of at least COMPILE_MIN_STEPS
# steps, and float models for runs of at least COMPILE_MIN_STEPS_FLOAT (a teacher, a long float run).
COMPILE_MIN_STEPS = 300
COMPILE_MIN_STEPS_FLOAT = 2500
PROGRESS_SECONDS = 2.0  # between two ``on_progress`` calls
LOG_PROGRESS_SECONDS = 60.0  # between two progress lines written to a log (stderr not a terminal)
_last_logged = -math.inf  # when ``print_progress`` last wrote a line to a log (time.monotonic)
# Images per forward pass without gradients (validation, a teacher's soft labels). On a CPU, the
# activations of a large batch overflow the caches and the elementwise layers (quantizers,
# BatchNorm, ReLU) run at memory speed: on 2 AMD EPYC cores (AVX2, fp32) a 4/4-bit ResNet-20
# evaluates 108 images/s at batch 1000 and 469 at batch 64, a float one 668 and 1,265, with the
# same logits to the bit (benchmarks/inference_batch.py; eval mode: each image's output is its own).
INFERENCE_BATCH = {"cpu": 64}
INFERENCE_BATCH_DEFAULT = 1000  # GPUs: large batches keep them busy
# Set by the command line's SIGINT / SIGTERM handler. The KeyboardInterrupt that handler raises can
# land in a weakref callback (torch.compile keeps many), where Python swallows it; the loop checks
# this flag every step, so a stop request is never lost.
STOP = threading.Event()


@dataclass(frozen=True)
class Recipe:
    """Training tricks that leave the audited model unchanged (fast-CIFAR-10 practice)."""

    ema_halflife: float = 0.0  # epochs; validate and keep an EMA of the weights; 0 disables
    pad_mode: str = "zeros"  # translation padding: zeros (mean colour) or reflect
    alternate_flip: bool = False  # mirror each image in every other epoch instead of at random
    # Fraction of the epochs trained in float before uncalibrated quantizers start (from trained
    # weights and activations, as QAT from a float model does); fine-tuning never goes float.
    float_warmup: float = 0.0
    batch_size: int = 256  # the run's batch size unless its TrainConfig names one

    def __post_init__(self) -> None:
        bad = self.ema_halflife < 0 or self.pad_mode not in PAD_MODES or not 0 <= self.float_warmup < 1
        if bad or self.batch_size < 1:
            raise ValueError(f"invalid recipe {self}")


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe(),
    # Batch 128 at the same peak learning rate: twice the steps at a higher rate per image, +2.6 points
    # at 10 epochs for a 4/4-bit ResNet-20 (benchmarks/results/README.md).
    "fast": Recipe(ema_halflife=0.5, pad_mode="reflect", alternate_flip=True, float_warmup=0.3, batch_size=128),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and at which learning rate."""


@dataclass
class TrainConfig:
    """Hyperparameters of one training run, e.g. ``TrainConfig(epochs=30, cutout=8)``."""

    epochs: int = 10
    batch_size: int | None = None  # None: the recipe's (baseline 256, fast 128), filled in here
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4  # applied to conv / linear weights only
    schedule: str = "onecycle"  # onecycle: linear warm-up then linear decay; cosine: warm-up then cosine
    warmup: float = 0.2  # fraction of the steps spent warming up
    label_smoothing: float = 0.1
    mixup: float = 0.0  # alpha of the Beta(alpha, alpha) mixing weight; 0 disables
    distill: float = 0.0  # weight of the distillation loss (the rest on the labels); needs a teacher
    temperature: float = 4.0  # softmax temperature of the distillation loss
    teacher_tta: bool = False  # soft labels from the teacher's mean logits on the image and its mirror
    crop: int = 4  # random-crop padding in pixels; 0 disables
    flip: bool = True
    cutout: int = 0  # cutout square side in pixels; 0 disables
    tta: bool = False  # evaluate on the image and its mirror (2 forward passes, both scored)
    recipe: str = "baseline"  # a name in RECIPES
    # The recipe's float warm-up before uncalibrated quantizers start; off for a model that starts
    # from trained float weights (quantization-aware fine-tuning).
    float_warmup: bool = True
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 where the hardware runs it natively)
    compile: str = "auto"  # auto | on | off (auto: runs of COMPILE_MIN_STEPS(_FLOAT) steps)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"TrainConfig.recipe has an invalid value {self.recipe!r}; use one of {list(RECIPES)}")
        if self.batch_size is None:
            self.batch_size = RECIPES[self.recipe].batch_size
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
            "distill": 0 <= self.distill <= 1,
            "temperature": self.temperature > 0,
            "teacher_tta": isinstance(self.teacher_tta, bool),
            "crop": self.crop >= 0,
            "cutout": 0 <= self.cutout <= 32,
            "precision": self.precision in PRECISIONS,
            "compile": self.compile in COMPILE,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig.{bad[0]} has an invalid value {getattr(self, bad[0])!r}")
        resolve_precision(self.precision, resolve_device(self.device))


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    lr: float
    seconds: float  # wall time of the run so far
    images_per_second: float  # training throughput of this epoch (compilation included)
    compile_seconds: float = 0.0  # time the first step of this epoch took beyond an ordinary step


@dataclass
class Progress:
    """Where a run is inside an epoch; ``train`` reports it every few seconds."""

    epoch: int
    epochs: int
    images: int  # images of this epoch done
    epoch_images: int
    images_per_second: float  # since the epoch started
    seconds_left: float  # of the whole run, at this epoch's pace


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


def _cpu_runs_bf16() -> bool:
    # torch exposes the CPU's bf16 units only through these helpers (no public equivalent).
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The training dtype: ``bf16`` (autocast) or ``fp32``; ``auto`` picks bf16 where it is native."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_runs_bf16()
    if name == "bf16" and device.type == "cuda" and not native:
        raise ValueError(f"precision bf16 requested but {torch.cuda.get_device_name(device)} has no bf16 support")
    if name == "bf16" and not native:  # 33 vs 317 images/s (benchmarks/results/trial_speed_cpu_avx2.json)
        slow = f"{device_name(device)} has no native bf16: it is emulated, about 10x slower than fp32"
        warnings.warn(slow, stacklevel=1)  # one location: shown once per process
    if name == "bf16" or (name == "auto" and native):
        return torch.bfloat16
    return torch.float32


def precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def device_name(device: torch.device) -> str:
    """A readable name of the device, recorded with every result."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    units = torch.backends.cpu.get_cpu_capability() + (" with bf16" if _cpu_runs_bf16() else "")
    return f"cpu ({platform.processor() or platform.machine()}, {units}, {torch.get_num_threads()} threads)"


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate at ``step`` of ``total``: a pure function of the step."""
    warm = int(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if config.schedule == "onecycle":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, device: torch.device, tta: bool = False, precision: str = "auto"
) -> Evaluation:
    """Top-1 accuracy on ``split``; with ``tta`` the logits of the image and its mirror are summed.

    The images enter in float32 whatever the precision: quantized layers evaluate exactly (see
    ``compression/_quant.py``) and their first quantizer sees the normalised pixels unrounded."""
    dtype = resolve_precision(precision, device)
    model.to(device, memory_format=torch.channels_last).eval()
    correct = torch.zeros((), device=device)
    for x, y in DeviceLoader(split, inference_batch(device), device, torch.float32):
        with _autocast(device, dtype):
            logits = model(x).float()
            if tta:
                logits = logits + model(x.flip(3)).float()
        correct += (logits.argmax(1) == y).sum()
    return Evaluation(correct.item() / max(1, len(split)), 2 if tta else 1, len(split))


def inference_batch(device: torch.device) -> int:
    """Images per forward pass without gradients on ``device`` (see ``INFERENCE_BATCH``)."""
    return INFERENCE_BATCH.get(device.type, INFERENCE_BATCH_DEFAULT)


def infer(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``model(x)`` without gradients, ``batch`` images at a time."""
    with torch.no_grad():
        return torch.cat([model(part) for part in x.split(batch)])


def mixup_loss(
    logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor | None, lam: float, smoothing: float
) -> torch.Tensor:
    """Cross-entropy against labels mixed as the images were: ``lam`` of each image's own label,
    ``1 - lam`` of its partner's (``perm``; None: no mixing)."""
    loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    if perm is None:
        return loss
    return lam * loss + (1 - lam) * F.cross_entropy(logits, labels[perm], label_smoothing=smoothing)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(teacher || student) of the temperature-softened distributions, times
    T^2 so its gradients keep their size as T changes; per sample, in float32."""
    t = temperature
    log_student = F.log_softmax(student.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Conv / linear weights decay; norm parameters, biases and quantizer step sizes do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # foreach: a few multi-tensor kernels per step, no host-device sync on CUDA. (Fused SGD cannot
    # mix fresh and existing momentum buffers, which a float warm-up produces for step sizes.)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, foreach=True)


class _EMA:
    """An exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, halflife_steps: float) -> None:
        # A pruned layer's ``weight`` is computed (weight_orig * weight_mask) and cannot be deep-copied;
        # the copy leaves it out and the pruning hook recomputes it on the copy's first forward.
        computed = {id(m.weight): None for m in model.modules() if hasattr(m, "weight_mask")}
        self.model = copy.deepcopy(model, memo=computed)
        self.decay = 0.5 ** (1 / halflife_steps)
        pairs = zip(self.model.state_dict().values(), model.state_dict().values())
        self.pairs = [(e, m) for e, m in pairs if m.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))  # early on, follow the model closely
        for e, m in self.pairs:
            e.lerp_(m, weight)


def _should_compile(config: TrainConfig, model: nn.Module, steps: int) -> bool:
    if config.compile != "auto":
        return config.compile == "on"
    return steps >= (COMPILE_MIN_STEPS if learned_quantizers(model) else COMPILE_MIN_STEPS_FLOAT)


def _compiled(model: nn.Module, on: bool) -> nn.Module:
    """``model`` compiled, or ``model`` itself (with one warning) where no compiler works."""
    if not on:
        return model
    # Compile in this process: no pool of compile workers that a Ctrl-C would also hit.
    torch._inductor.config.compile_threads = 1
    try:
        return torch.compile(model)
    except Exception as e:  # no C++ compiler, unsupported platform
        warnings.warn(f"torch.compile unavailable ({e}); training eagerly", stacklevel=3)
        return model


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    checkpoint: str | Path | None = None,
    teacher: nn.Module | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place on ``data.train``, validating on ``data.val`` after every epoch.

    ``on_epoch`` sees each epoch's stats; it may raise to stop training (a search pruner does).
    ``on_progress`` is called every few seconds inside an epoch. With ``checkpoint``, the run's
    whole state (weights, optimizer, EMA, data order, random state) is written there after every
    epoch, and a run that finds the file resumes after its last epoch instead of starting again.
    With ``config.distill > 0``, ``teacher`` (a trained network, left unchanged) gives the soft
    labels of the distillation loss, on the same augmented (and mixed) images as the student.
    Example: ``history = train(model, load_data(DataConfig()), TrainConfig(epochs=3))``.
    """
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    recipe = RECIPES[config.recipe]
    if config.distill and teacher is None:
        raise ValueError(f"TrainConfig.distill = {config.distill} needs a teacher network")
    if config.distill:
        teacher = teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        teacher_batch = inference_batch(device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device, memory_format=torch.channels_last)
    loader = DeviceLoader(
        data.train,
        config.batch_size,
        device,
        dtype,
        train=True,
        crop=config.crop,
        pad_mode=recipe.pad_mode,
        flip=config.flip,
        alternate_flip=recipe.alternate_flip,
        cutout=config.cutout,
        seed=config.seed,
    )
    if len(loader) == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train)} training images")
    optimizer = _optimizer(model, config)
    hooks = install_training_hooks(model, optimizer)
    mix = torch.distributions.Beta(config.mixup, config.mixup) if config.mixup > 0 else None
    total = config.epochs * len(loader)
    compile_on = _should_compile(config, model, total)
    if config.distill:  # by the same rule: a quantized teacher's soft labels cost what its quantizers do
        teacher = _compiled(teacher, _should_compile(config, teacher, total))
    # A float warm-up only for quantizers that start from scratch (not when fine-tuning).
    warm_up = config.float_warmup and not calibrated(model)
    float_epochs = math.floor(recipe.float_warmup * config.epochs) if warm_up else 0

    def start_phase(quantized: bool) -> nn.Module:
        """Quantizers on or off; calibrated eagerly on one batch, then the step is (re)compiled."""
        set_quantization_(model, quantized)
        model.train()
        with _autocast(device, dtype):
            calibrate_(model, loader.images[: config.batch_size])
        return _compiled(model, compile_on)

    step, start, history, first, saved = 0, time.perf_counter(), [], 1, None
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        if saved["done"]:
            return [EpochStats(**h) for h in saved["history"]]
        optimizer.load_state_dict(saved["optimizer"])
        loader.gen.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        loader.epoch, step, float_epochs = saved["epoch"], saved["step"], saved["float_epochs"]
        history = [EpochStats(**h) for h in saved["history"]]
        first, start = saved["epoch"] + 1, start - history[-1].seconds

    def save(done: bool = False) -> None:
        state = {
            "done": done,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": loader.gen.get_state(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "step": step,
            "float_epochs": float_epochs,
            "history": [asdict(h) for h in history],
            "ema": ema.model.state_dict() if ema else None,
        }
        tmp = Path(f"{checkpoint}.tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    epoch, ema = first - 1, None
    if saved and saved["ema"] and first > config.epochs:  # stopped between the last epoch and the end
        model.load_state_dict(saved["ema"])
    for epoch in range(first, config.epochs + 1):
        new_phase = epoch in (first, float_epochs + 1)
        if new_phase:
            step_model = start_phase(quantized=epoch > float_epochs)
            ema = _EMA(model, recipe.ema_halflife * len(loader)) if recipe.ema_halflife else None
            if ema and saved and saved["ema"] and epoch == first != float_epochs + 1:
                ema.model.load_state_dict(saved["ema"])  # resumed inside a phase: its average goes on
        model.train()
        epoch_start = last_report = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i, (x, y) in enumerate(loader):
            if STOP.is_set():
                raise KeyboardInterrupt
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lam = float(mix.sample()) if mix else 1.0
            perm = torch.randperm(len(y), device=device) if mix else None
            x_in = lam * x + (1 - lam) * x[perm] if mix else x
            with _autocast(device, dtype):
                logits = step_model(x_in)
                loss = mixup_loss(logits, y, perm, lam, config.label_smoothing)
                if config.distill:
                    soft = infer(teacher, x_in, teacher_batch)
                    if config.teacher_tta:
                        soft = (soft + infer(teacher, x_in.flip(3), teacher_batch)) / 2
                    loss = (1 - config.distill) * loss + config.distill * distillation_loss(
                        logits, soft, config.temperature
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema:
                ema.update(step)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            step += 1
            now = time.perf_counter()
            if i == 0:
                first_step = now - epoch_start
            if on_progress and now - last_report >= PROGRESS_SECONDS:
                last_report = now
                done = (i + 1) * config.batch_size
                rate = done / (now - epoch_start)
                left = (total - step) * config.batch_size / rate
                on_progress(Progress(epoch, config.epochs, done, len(loader) * config.batch_size, rate, left))
        mean_loss = loss_sum.item() / len(loader)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} in epoch {epoch} (peak lr {config.lr}); "
                "lower the learning rate or raise the bits"
            )
        seen = len(loader) * config.batch_size
        epoch_seconds = time.perf_counter() - epoch_start
        ordinary_step = (epoch_seconds - first_step) / max(1, len(loader) - 1)
        compiled = step_model is not model  # compile_on, unless no compiler worked
        compile_seconds = max(0.0, first_step - ordinary_step) if new_phase and compiled else 0.0
        judged = ema.model if ema else model
        stats = EpochStats(
            epoch=epoch,
            train_loss=mean_loss,
            train_acc=correct.item() / seen,
            val_acc=evaluate(judged, data.val, device, config.tta, config.precision).accuracy
            if len(data.val)
            else float("nan"),
            lr=lr,
            seconds=time.perf_counter() - start,
            images_per_second=seen / epoch_seconds,
            compile_seconds=compile_seconds,
        )
        history.append(stats)
        if checkpoint is not None:
            save()
        if on_epoch:
            on_epoch(stats)
    if ema:
        model.load_state_dict(ema.model.state_dict())
    if checkpoint is not None:
        save(done=True)
    for hook in hooks:
        hook.remove()
    return history


def print_progress(p: Progress) -> None:
    """One updating line on stderr when it is a terminal; in a log, a line every
    ``LOG_PROGRESS_SECONDS`` (an epoch of a quantized model on a CPU lasts minutes)."""
    global _last_logged
    line = (
        f"epoch {p.epoch}/{p.epochs}  {p.images:,}/{p.epoch_images:,} images  "
        f"{p.images_per_second:,.0f} img/s  {p.seconds_left:,.0f}s left"
    )
    if sys.stderr.isatty():
        print(f"\r  {line}\x1b[K", end="", file=sys.stderr, flush=True)
    elif time.monotonic() - _last_logged >= LOG_PROGRESS_SECONDS:
        _last_logged = time.monotonic()
        print(line, file=sys.stderr, flush=True)
