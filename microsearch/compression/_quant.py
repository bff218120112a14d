"""Quantization-aware layers: fake-quantized weights, activations and biases with a
straight-through estimator (STE). The audited score reads the bit-widths from these layers.

Bit-widths: 32 is full precision, 16 is half precision (float16 rounding), 2..8 are uniform
integer levels with a learned step size (LSQ, Esser et al. 2020), 1 is BinaryConnect's sign.

Exact in every training precision: a quantizer's math runs in float32 even under bf16 autocast,
and a quantized conv / linear layer runs on the integer *levels* of its input and weights (exact
in bf16 up to 8 bits: bf16 holds every integer up to 256), then rescales its output by the product
of the two step sizes in float32. Training under bf16 rounds that output to bf16; evaluation (a
layer in eval mode) keeps it in float32, so a quantized layer is evaluated exactly as the audit
claims in any precision, and a quantized model's accuracy does not depend on it.

The quantizers are chains of plain tensor operations so that ``torch.compile`` fuses them; they
initialise their step size from the first batch they see (``calibrate_`` runs that batch eagerly,
before a model is compiled).
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, 32)
BIAS_BITS = (8, 16, 32)


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
        _check_bits("bias bits", self.bias, BIAS_BITS)


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
    # (weight, act) bits by layer name or module prefix ("stages.2": every layer under it); the
    # longest key that matches a layer wins
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, WEIGHT_BITS)
        _check_bits("act_bits", self.act_bits, ACT_BITS)
        if self.bias_bits is not None:
            _check_bits("bias_bits", self.bias_bits, BIAS_BITS)
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits, ACT_BITS)
        for name, (w, a) in self.layer_bits.items():
            _check_bits(f"layer_bits[{name!r}] weight", w, WEIGHT_BITS)
            _check_bits(f"layer_bits[{name!r}] activation", a, ACT_BITS)


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``x`` in the backward pass."""
    return x + (value - x).detach()


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``factor`` (LSQ's step-size scaling)."""
    return _ste(x * factor, x)


def _half_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value (ties to even), in ``x``'s dtype.

    Integer arithmetic on the float32 bits rather than ``x.half().float()``: ``torch.compile``
    drops a float16 round trip inside a fused kernel, but not this.
    """
    f = x.float()
    bits = f.view(torch.int32)
    normal = ((bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)  # 10-bit mantissa
    tiny = torch.round(f * 2.0**24) * 2.0**-24  # float16 subnormals have a fixed spacing of 2^-24
    out = torch.where(f.abs() < 2.0**-14, tiny, normal)
    return torch.where(out.abs() > 65504, out.sign() * torch.inf, out).to(x.dtype)


class Quantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits``; ``signed=None`` decides from the first batch it sees.

    ``per_sample``: the tensor is a batch of activations, so LSQ's gradient scale
    ``1 / sqrt(N * Q_P)`` counts the elements of one sample, not of the batch.
    """

    def __init__(self, bits: int, signed: bool | None = True, per_sample: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.per_sample = per_sample
        self.scale = nn.Parameter(torch.ones(())) if 2 <= bits <= 8 else None
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(True if signed is None else signed))
        self._decide_sign = signed is None
        self._levels: tuple[int, int] | None = None  # cached on the host: no device sync per step
        self.enabled = True  # off: the identity (a training recipe may start in float)

    def levels(self) -> tuple[int, int]:
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(levels, step)`` with ``levels * step`` the quantized ``x``; ``step`` is None where the
        levels are the values themselves (32, 16 and 1 bit). Levels of 2-8 bits are integers in
        float32; their gradients are LSQ's (STE through the rounding, clipped outside the range)."""
        if self.bits == 32 or not self.enabled:
            return x, None
        if self.bits == 16:
            # bf16 and float16 are 16-bit already. Compiled training skips rounding 16-bit
            # parameters (at most 2^-11 relative): the compiler would redo it for every element
            # of the layer's output. Evaluation and the audit run eagerly and round exactly.
            skip = x.element_size() == 2 or (not self.per_sample and torch.compiler.is_compiling())
            return (x if skip else _ste(x, _half_rounded(x))), None
        if self.bits == 1:  # BinaryConnect: sign, gradient passed where |x| <= 1 (hardtanh STE)
            clipped = x.clamp(-1, 1)
            return _ste(clipped, torch.sign(clipped)), None
        if self._levels is None:
            if not bool(self.initialized):
                self._initialize(x.detach())
            self._levels = self.levels()
        lo, hi = self._levels
        step = self.step_for(x)
        scaled = torch.clamp(x.float() / step, lo, hi)
        return _ste(scaled, torch.round(scaled)), step

    def step_for(self, x: torch.Tensor) -> torch.Tensor:
        """The step size applied to ``x``, with LSQ's gradient scale for its element count."""
        n = x[0].numel() if self.per_sample else x.numel()
        hi = (self._levels or self.levels())[1]  # cached: reading ``signed`` would break a compiled graph
        return _scale_grad(self.scale.abs() + 1e-8, 1.0 / math.sqrt(n * hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels, step = self.split(x)
        return levels if step is None else levels * step

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self._decide_sign:
            self.signed.fill_(bool((x < 0).any()))
        hi = self.levels()[1]
        self.scale.copy_(2 * x.float().abs().mean() / math.sqrt(hi) + 1e-8)
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # The loaded buffers decide the levels, read here once: a loaded model compiles into one
        # graph (reading them in its first forward pass would split it into a graph per layer).
        self._levels = self.levels() if bool(self.initialized) else None

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _QuantMixin:
    """Shared state of the quantized layers: one quantizer each for weight, input and bias."""

    def _attach(self, bits: LayerBits) -> None:
        self.weight_quant = Quantizer(bits.weight, signed=True)
        self.act_quant = Quantizer(bits.act, signed=None, per_sample=True)
        self.bias_quant = Quantizer(bits.bias, signed=True)

    @property
    def bits(self) -> LayerBits:
        return LayerBits(self.weight_quant.bits, self.act_quant.bits, self.bias_quant.bits)

    @property
    def stored_scales(self) -> int:
        """Learned step sizes stored with the layer (one float32 each)."""
        quantizers = (self.weight_quant, self.act_quant, self.bias_quant)
        return sum(q.scale.numel() for q in quantizers if q.scale is not None)

    def _qbias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias_quant(self.bias)

    def _on_levels(self, x: torch.Tensor, op) -> torch.Tensor:
        """``op(input levels, weight levels)`` rescaled by the product of the step sizes in float32."""
        x_levels, x_step = self.act_quant.split(x)
        w_levels, w_step = self.weight_quant.split(self.weight)
        if x_levels.ndim == 4:  # an explicit layout: oneDNN's conv backward crashed on the ambiguous
            # strides the elementwise chain can leave (1x1 kernels, batch 25); a no-op when already so
            x_levels = x_levels.contiguous(memory_format=torch.channels_last)
            w_levels = w_levels.contiguous(memory_format=torch.channels_last)
        device = x_levels.device.type
        if not self.training and torch.is_autocast_enabled(device):
            # Evaluation computes what the audit claims: exact float32 sums of the levels, not sums
            # rounded to bf16 (8 significant bits, where a conv's integer sums need up to ~17).
            with torch.autocast(device, enabled=False):
                out = op(x_levels.float(), w_levels.float())
        else:
            out = op(x_levels, w_levels)
        steps = [s for s in (x_step, w_step) if s is not None]
        if steps:  # back in the compute dtype: bf16 holds the product as exactly as the conv's output
            out = (out.float() * math.prod(steps)).to(out.dtype)
        bias = self._qbias()
        if bias is None:
            return out
        return out + (bias.view(1, -1, 1, 1) if out.ndim == 4 else bias)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the parameters and buffers of ``old`` (the same tensors, not copies)."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    return new.to(old.weight.device)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def __init__(self, *args, bits: LayerBits = LayerBits(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._attach(bits)

    @classmethod
    def from_float(cls, m: nn.Conv2d, bits: LayerBits) -> "QuantConv2d":
        new = cls(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.bias is not None,
            m.padding_mode,
            bits=bits,
        )
        return _adopt(new, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._on_levels(x, lambda xl, wl: self._conv_forward(xl, wl, None))


class QuantLinear(_QuantMixin, nn.Linear):
    def __init__(self, *args, bits: LayerBits = LayerBits(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._attach(bits)

    @classmethod
    def from_float(cls, m: nn.Linear, bits: LayerBits) -> "QuantLinear":
        return _adopt(cls(m.in_features, m.out_features, m.bias is not None, bits=bits), m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._on_levels(x, F.linear)


class QuantBatchNorm2d(_QuantMixin, nn.BatchNorm2d):
    """BatchNorm with quantized input, affine weight and bias (all at the plan's bias bits)."""

    def __init__(self, *args, bits: LayerBits = LayerBits(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._attach(bits)

    @classmethod
    def from_float(cls, m: nn.BatchNorm2d, bits: LayerBits) -> "QuantBatchNorm2d":
        return _adopt(cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, bits=bits), m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm2d.forward with quantized tensors; momentum=None is a cumulative average.
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            self.act_quant(x),
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            None if self.weight is None else self.weight_quant(self.weight),
            self._qbias(),
            use_batch,
            factor,
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


def resolve_layer_bits(names: list[str], layer_bits: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``(weight, act)`` bits of each layer in ``names`` that a key of ``layer_bits`` names, the key a
    layer name or a module prefix ("stages.2" names "stages.2.0.conv1.0"); the longest matching key wins."""

    def names_it(name: str, key: str) -> bool:
        return name == key or name.startswith(key + ".")

    unknown = sorted(k for k in layer_bits if not any(names_it(n, k) for n in names))
    if unknown:
        raise ValueError(f"layer_bits names unknown layers {unknown}")
    resolved = {}
    for name in names:
        keys = [k for k in layer_bits if names_it(name, k)]
        if keys:
            resolved[name] = tuple(layer_bits[max(keys, key=len)])
    return resolved


def quant_plan(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, int]]:
    """Resolve ``config`` into per-layer bits for every conv, linear and BatchNorm of ``model``; a layer
    at 32 bits throughout (weights, inputs, biases) is float and left out."""
    bias_bits = config.bias_bits or max(16, config.weight_bits)
    names = compute_layers(model)
    layer_bits = resolve_layer_bits(names, config.layer_bits)
    ends = {names[0], names[-1]} if config.first_last_bits is not None else set()
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            plan[name] = asdict(LayerBits(bias_bits, bias_bits, bias_bits))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            w, a = config.weight_bits, config.act_bits
            if name in ends:
                w = a = config.first_last_bits
            w, a = layer_bits.get(name, (w, a))
            plan[name] = asdict(LayerBits(w, a, bias_bits))
    return {name: bits for name, bits in plan.items() if set(bits.values()) != {32}}


def apply_quant_plan_(model: nn.Module, plan: dict[str, dict[str, int]]) -> nn.Module:
    """Replace the layers named in ``plan`` (through their parents) by quantized layers built
    around the same parameters and buffers; a layer quantized already gets new quantizers."""
    for name, bits in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
        if prune.is_pruned(old):
            raise ValueError(f"layer {name} carries a pruning mask; quantize before pruning")
        quant_class = type(old) if isinstance(old, QUANT_LAYERS) else _QUANT_CLASSES.get(type(old))
        if quant_class is None:
            raise ValueError(f"layer {name} is a {type(old).__name__}, which has no quantized version")
        setattr(parent, child, quant_class.from_float(old, LayerBits(**bits)))
    return model


def quantize_(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, int]]:
    """Quantize ``model`` in place for quantization-aware training; returns the per-layer plan."""
    plan = quant_plan(model, config)
    apply_quant_plan_(model, plan)
    return plan


def requantize_layers_(model: nn.Module, layer_bits: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Give the layers that ``layer_bits`` names (as in ``QuantConfig.layer_bits``) new weight and input
    bits, with step sizes calibrated afresh on the next batch; every other layer keeps its bits and its
    learned steps (progressive quantization of part of a trained model). Returns the changed layers' plan."""
    plan = {}
    for name, (w, a) in resolve_layer_bits(compute_layers(model), layer_bits).items():
        layer = model.get_submodule(name)
        now = asdict(layer.bits) if isinstance(layer, QUANT_LAYERS) else None  # None: a float layer
        bits = asdict(LayerBits(w, a, now["bias"] if now else 32))
        if bits != now:
            plan[name] = bits
    apply_quant_plan_(model, plan)
    return plan


def current_plan(model: nn.Module) -> dict[str, dict[str, int]]:
    """The per-layer bits of a quantized model (empty for a float model); saved in checkpoints."""
    return {n: asdict(m.bits) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def learned_quantizers(model: nn.Module) -> list[Quantizer]:
    """The quantizers with a learned step size (2-8 bits): the ones that cost training time."""
    return [q for q in model.modules() if isinstance(q, Quantizer) and q.scale is not None]


@torch.no_grad()
def calibrate_(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise every quantizer's step size (and sign) from one batch, eagerly; a model is
    calibrated before ``torch.compile`` so that the compiled graph has no data-dependent branch."""
    waiting = [q for q in learned_quantizers(model) if q.enabled and q._levels is None]
    if any(not bool(q.initialized) for q in waiting):
        model(x)
    for q in waiting:  # loaded from a file: the buffers already hold sign and step
        q._levels = q.levels()


def calibrated(model: nn.Module) -> bool:
    """True unless some learned-step quantizer has not seen a batch yet (a fresh quantized model)."""
    return all(bool(q.initialized) for q in learned_quantizers(model))


def set_quantization_(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer on or off (off: the float model). Quantizers that were never
    calibrated initialise from the first batch after they are switched on."""
    for q in model.modules():
        if isinstance(q, Quantizer):
            q.enabled = enabled


@torch.no_grad()
def clamp_binary_weights_(model: nn.Module) -> None:
    """BinaryConnect keeps its real-valued weights in [-1, 1]."""
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS) and m.weight_quant.bits == 1:
            m.weight.clamp_(-1, 1)


def _learned_weight(m: nn.Module) -> bool:
    return isinstance(m, QUANT_LAYERS) and m.weight_quant.scale is not None


def _learned_weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _learned_weight(m)]


@torch.no_grad()
def bound_weight_steps_(layers: list[nn.Module]) -> None:
    """Keep each learned weight step size in (0, max |w|]: a larger step rounds every weight of
    the layer to zero. At high learning rates the step can grow past that bound, since shrinking a
    whole layer is a quick way to lower a noisy loss; the layer then stays dead (seen on the 8-bit
    classifier: constant predictions, 10% accuracy, for the rest of the run)."""
    for m in layers:
        if m.weight_quant.enabled:
            step = m.weight_quant.scale  # tensors only: no host-device synchronisation
            step.copy_(torch.minimum(step.clamp(min=1e-8), m.weight.detach().abs().amax().clamp(min=1e-8)))


@torch.no_grad()
def snap_weights_(model: nn.Module) -> None:
    """Replace every weight with a learned step size by its quantized value (levels x step).

    The model computes exactly what it did (quantizing a quantized weight returns it), and its
    weights are what it runs on: one that quantizes to zero is a zero, for the audit's count of
    nonzeros, and the model file stores the layer as int8 levels (``weight_levels``)."""
    for m in _learned_weight_layers(model):
        if m.weight_quant.enabled and bool(m.weight_quant.initialized):
            levels, step = m.weight_quant.split(m.weight)
            m.weight.copy_(levels * step)


@torch.no_grad()
def weight_levels(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state_dict key: int8 levels}`` of the weights that are exactly their quantized value
    (``snap_weights_``); ``set_weight_levels_`` restores them bit for bit."""
    found = {}
    for name, m in model.named_modules():
        if _learned_weight(m) and bool(m.weight_quant.initialized):
            levels, step = m.weight_quant.split(m.weight)
            if torch.equal(levels * step, m.weight):
                found[f"{name}.weight"] = levels.to(torch.int8).cpu()
    return found


@torch.no_grad()
def set_weight_levels_(model: nn.Module, levels: dict[str, torch.Tensor]) -> None:
    """Set the weights named in ``levels`` (from ``weight_levels``) to levels x their layer's step;
    the step sizes must be loaded first. Fails if a weight does not quantize back to its levels."""
    for key, stored in levels.items():
        m = model.get_submodule(key.removesuffix(".weight"))
        if not _learned_weight(m) or tuple(stored.shape) != tuple(m.weight.shape):
            raise ValueError(f"{key}: levels of shape {tuple(stored.shape)} do not fit a quantized weight")
        values = stored.to(m.weight)
        m.weight.copy_(values * m.weight_quant.step_for(m.weight))
        if not torch.equal(m.weight_quant.split(m.weight)[0], values):
            raise ValueError(f"{key}: the stored levels do not quantize back to themselves")


def install_training_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """What quantized layers need after every optimizer step (BinaryConnect's clamp, the bound
    on learned weight step sizes); returns the hook handles, which the training loop removes
    when it is done."""
    hooks = []
    if any(isinstance(m, QUANT_LAYERS) and m.weight_quant.bits == 1 for m in model.modules()):
        hooks.append(optimizer.register_step_post_hook(lambda *_: clamp_binary_weights_(model)))
    layers = _learned_weight_layers(model)  # found once, not at every step
    if layers:
        hooks.append(optimizer.register_step_post_hook(lambda *_: bound_weight_steps_(layers)))
    return hooks
