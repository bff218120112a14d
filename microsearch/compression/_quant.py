"""Quantization-aware layers: fake-quantized weights, activations and biases with a
straight-through estimator (STE). The audited score reads the bit-widths from these layers.

Bit-widths: 32 is full precision, 16 is half precision (float16 rounding), 2..8 are uniform
integer levels with a learned scale (LSQ, Esser et al. 2020), 1 is BinaryConnect's sign.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)


def _check_bits(name: str, value: int, allowed: tuple[int, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LayerBits:
    """Bit-widths of one layer: its weights, its input activations, its bias / norm parameters."""

    weight: int = 32
    act: int = 32
    bias: int = 32

    def __post_init__(self) -> None:
        _check_bits("weight bits", self.weight, WEIGHT_BITS)
        _check_bits("activation bits", self.act, ACT_BITS)
        _check_bits("bias bits", self.bias, (8, 16, 32))


@dataclass
class QuantConfig:
    """How to quantize a model: one setting for all layers, then optional overrides.

    Example: ``quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))``.
    """

    weight_bits: int = 8
    act_bits: int = 8
    # Biases and BatchNorm parameters; None: max(16, weight_bits). Low-bit norm scales cost
    # accuracy for little memory, and deployments fold them into a 16-bit bias.
    bias_bits: int | None = None
    first_last_bits: int | None = None  # weights and activations of the first and last layer
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (weight, act)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, WEIGHT_BITS)
        _check_bits("act_bits", self.act_bits, ACT_BITS)
        if self.bias_bits is not None:
            _check_bits("bias_bits", self.bias_bits, (8, 16, 32))
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits, ACT_BITS)
        for name, (w, a) in self.layer_bits.items():
            _check_bits(f"layer_bits[{name!r}] weight", w, WEIGHT_BITS)
            _check_bits(f"layer_bits[{name!r}] activation", a, ACT_BITS)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _SignSTE(torch.autograd.Function):
    """BinaryConnect: sign in the forward pass, gradient passed where |x| <= 1 (hardtanh STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)  # pruned (zero) weights stay zero

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``factor`` (LSQ's step-size scaling)."""
    return (x - x * factor).detach() + x * factor


class Quantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits``; ``signed=None`` decides from the first batch it sees."""

    def __init__(self, bits: int, signed: bool | None = True) -> None:
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(())) if 2 <= bits <= 8 else None
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(True if signed is None else signed))
        self._decide_sign = signed is None
        self._levels: tuple[int, int] | None = None  # cached on the host: no device sync per step

    def levels(self) -> tuple[int, int]:
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 32:
            return x
        if self.bits == 16:
            return x + (x.half().to(x.dtype) - x).detach()
        if self.bits == 1:
            return _SignSTE.apply(x)
        if self._levels is None:
            if not bool(self.initialized):
                self._initialize(x.detach())
            self._levels = self.levels()
        lo, hi = self._levels
        step = _scale_grad(self.scale.abs() + 1e-8, 1.0 / math.sqrt(x.numel() * hi))
        return _RoundSTE.apply(torch.clamp(x / step, lo, hi)) * step

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self._decide_sign:
            self.signed.fill_(bool((x < 0).any()))
        hi = self.levels()[1]
        self.scale.copy_(2 * x.abs().mean() / math.sqrt(hi) + 1e-8)
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._levels = None  # the loaded buffers decide again

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _QuantMixin:
    """Shared state of the quantized layers: one quantizer each for weight, input and bias."""

    def _attach(self, bits: LayerBits) -> None:
        self.weight_quant = Quantizer(bits.weight, signed=True)
        self.act_quant = Quantizer(bits.act, signed=None)
        self.bias_quant = Quantizer(bits.bias, signed=True)

    @property
    def bits(self) -> LayerBits:
        return LayerBits(self.weight_quant.bits, self.act_quant.bits, self.bias_quant.bits)

    def _qbias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias_quant(self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self._qbias())


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self._qbias())


class QuantBatchNorm2d(_QuantMixin, nn.BatchNorm2d):
    """BatchNorm with quantized input, affine weight and bias (all at the plan's bias bits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or self.running_mean is None
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            self.act_quant(x),
            self.running_mean,
            self.running_var,
            self.weight_quant(self.weight),
            self._qbias(),
            use_batch,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


_QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.BatchNorm2d: QuantBatchNorm2d,
}
QUANT_LAYERS = tuple(_QUANT_CLASSES.values())


def compute_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear layers, in registration order (first and last are the ends)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quant_plan(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, int]]:
    """Resolve ``config`` into per-layer bits for every conv, linear and BatchNorm of ``model``."""
    bias_bits = config.bias_bits or max(16, config.weight_bits)
    names = compute_layers(model)
    unknown = sorted(set(config.layer_bits) - set(names))
    if unknown:
        raise ValueError(f"layer_bits names unknown layers {unknown}")
    ends = {names[0], names[-1]} if config.first_last_bits is not None else set()
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            plan[name] = asdict(LayerBits(bias_bits, bias_bits, bias_bits))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            w, a = config.weight_bits, config.act_bits
            if name in ends:
                w = a = config.first_last_bits
            w, a = config.layer_bits.get(name, (w, a))
            plan[name] = asdict(LayerBits(w, a, bias_bits))
    return plan


def apply_quant_plan_(model: nn.Module, plan: dict[str, dict[str, int]]) -> nn.Module:
    """Swap the layers named in ``plan`` for quantized ones sharing the same parameters."""
    for name, bits in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
        base = next(b for b in _QUANT_CLASSES if isinstance(old, b))
        new = _QUANT_CLASSES[base].__new__(_QUANT_CLASSES[base])
        new.__dict__.update(old.__dict__)  # parameters, buffers and hooks (pruning masks) carry over
        new._modules = dict(old._modules)
        new._attach(LayerBits(**bits))
        new.to(next(old.parameters()).device)
        setattr(parent, child, new)
    return model


def quantize_(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, int]]:
    """Quantize ``model`` in place for quantization-aware training; returns the per-layer plan."""
    plan = quant_plan(model, config)
    apply_quant_plan_(model, plan)
    return plan


def current_plan(model: nn.Module) -> dict[str, dict[str, int]]:
    """The per-layer bits of a quantized model (empty for a float model); saved in checkpoints."""
    return {n: asdict(m.bits) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


@torch.no_grad()
def clamp_binary_weights_(model: nn.Module) -> None:
    """BinaryConnect keeps its real-valued weights in [-1, 1]; call after each optimizer step."""
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS) and m.weight_quant.bits == 1:
            m.weight.clamp_(-1, 1)
