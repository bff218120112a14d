"""The audited compression score, computed per layer from the model itself.

    score = sum_l nonzero_l * (q_w/32) / P_ref  +  sum_l ops_l * (max(q_w, q_a)/32) / F_ref

Parameters and nonzeros are counted from the tensors, operations from the layers a forward pass
actually runs, bits from the quantizers (or the dtype) of each layer. Structured pruning is
physical, so removed channels are simply absent. docs/design.md gives both rules and the test vectors.
"""

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from microsearch.compression import QUANT_LAYERS

_COSTED = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Rule:
    name: str
    param_ref: float  # parameters of the reference model, in 32-bit equivalents
    ops_ref: float  # operations of the reference model
    scale_adds: bool  # False: only multiplications are scaled by the bit ratio (micronet)


RULES: dict[str, Rule] = {
    "lab4": Rule("lab4", 5.6e6, 8.3e8, scale_adds=True),
    "micronet": Rule("micronet", 5_586_981, 834_362_880, scale_adds=False),
}


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    params: int  # all parameters of the layer (weights, biases, norm affine, quantizer scales)
    nonzero: int  # nonzero conv/linear weights plus the (dense) biases, norm params and scales
    weight_bits: int
    act_bits: int
    bias_bits: int
    mult_ops: int  # bit-scaled under every rule
    add_ops: int  # bit-scaled under lab4, full cost under micronet
    params_32bit: float  # nonzeros in 32-bit equivalents (scaled by their bits)
    ops_32bit: float  # operations in 32-bit equivalents (scaled by the rule's bit ratio)


@dataclass
class Score:
    rule: str
    passes: int  # forward passes per prediction (test-time augmentation multiplies the ops)
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        """All parameters, counted."""
        return sum(layer.params for layer in self.layers)

    @property
    def nonzero_params(self) -> int:
        return sum(layer.nonzero for layer in self.layers)

    @property
    def ops(self) -> int:
        """All operations of one prediction (every test-time augmentation pass), counted."""
        return self.passes * sum(layer.mult_ops + layer.add_ops for layer in self.layers)

    @property
    def params_32bit(self) -> float:
        """Nonzero parameters in 32-bit equivalents: what the parameter term divides."""
        return sum(layer.params_32bit for layer in self.layers)

    @property
    def ops_32bit(self) -> float:
        """Operations in 32-bit equivalents: what the operations term divides."""
        return self.passes * sum(layer.ops_32bit for layer in self.layers)

    @property
    def param_term(self) -> float:
        return self.params_32bit / RULES[self.rule].param_ref

    @property
    def ops_term(self) -> float:
        return self.ops_32bit / RULES[self.rule].ops_ref

    @property
    def score(self) -> float:
        return self.param_term + self.ops_term

    def to_dict(self) -> dict:
        keys = ("params", "nonzero_params", "ops", "params_32bit", "ops_32bit")
        summary = {k: getattr(self, k) for k in keys}
        terms = {k: getattr(self, k) for k in ("param_term", "ops_term", "score")}
        layers = [asdict(layer) for layer in self.layers]
        return {"rule": self.rule, "passes": self.passes, **summary, **terms, "layers": layers}


def _dtype_bits(t: torch.Tensor) -> int:
    return {torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}.get(t.dtype, 32)


def _bits(quantized: int, t: torch.Tensor) -> int:
    """Bits of ``t`` under a quantizer of ``quantized`` bits (32: none, the dtype decides)."""
    return _dtype_bits(t) if quantized >= 32 else min(quantized, _dtype_bits(t))


def _ops(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    """(multiplications, additions) of one forward pass of ``module`` for one sample."""
    n = out[0].numel()
    bias = int(getattr(module, "bias", None) is not None)
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return n * k, n * (k - 1 + bias)
    if isinstance(module, nn.Linear):
        return n * module.in_features, n * (module.in_features - 1 + bias)
    return 0, 3 * n  # BatchNorm: 3 ops per element, counted at full cost by the reference profiler


def _layer_cost(name: str, module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], rule: Rule) -> LayerCost:
    """One layer's cost: its stored parameters once, the operations of every call (none if it never ran)."""
    weight, bias = module.weight, module.bias
    is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
    w_bits = a_bits = b_bits = 32
    if isinstance(module, QUANT_LAYERS):
        w_bits, a_bits, b_bits = module.bits.weight, module.bits.act, module.bits.bias
    w_bits = _bits(w_bits, weight)
    a_bits = max((_bits(a_bits, inp) for inp, _ in calls), default=_bits(a_bits, weight))
    if is_norm:
        w_bits = a_bits = b_bits = min(w_bits, _bits(b_bits, weight))  # norm weight and bias share the bias bits
    # Pruning zeroes conv and linear weights; biases and norm parameters are stored densely
    # (a fresh BatchNorm bias is exactly zero and still occupies memory).
    w_nonzero = weight.numel() if is_norm else int(torch.count_nonzero(weight))
    b_count = 0 if bias is None else bias.numel()
    if bias is not None:
        b_bits = _bits(b_bits, bias)
    # Learned quantizer step sizes are stored with the model, one float32 each.
    scales = module.stored_scales if isinstance(module, QUANT_LAYERS) else 0
    mults = adds = 0
    for _, out in calls:
        m, a = _ops(module, out)
        mults, adds = mults + m, adds + a
    ratio = max(w_bits, a_bits) / 32
    ops_32bit = (mults + adds) * ratio if rule.scale_adds else mults * ratio + adds
    return LayerCost(
        name=name,
        kind=type(module).__name__,
        params=weight.numel() + b_count + scales,
        nonzero=w_nonzero + b_count + scales,
        weight_bits=w_bits,
        act_bits=a_bits,
        bias_bits=b_bits if bias is not None else w_bits,
        mult_ops=mults,
        add_ops=adds,
        params_32bit=(w_nonzero * w_bits + b_count * b_bits) / 32 + scales,
        ops_32bit=ops_32bit,
    )


# Buffers a layer may hold that carry no weights: norm statistics, pruning masks, quantizer state.
_STATE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "weight_mask", "bias_mask")


def _auditable(model: nn.Module, costed: dict[str, nn.Module]) -> None:
    """Refuse what the audit could not cost: parameters outside conv / linear / norm layers, and
    floating-point buffers that are not norm statistics or masks (weights applied functionally)."""
    owned = {id(p) for m in costed.values() for p in m.parameters()}  # incl. quantizer scales
    stray = [n for n, p in model.named_parameters() if id(p) not in owned]
    if stray:
        raise ValueError(f"parameters outside conv/linear/norm layers cannot be scored: {stray}")
    hidden = [
        n for n, b in model.named_buffers() if b.is_floating_point() and n.rpartition(".")[2] not in _STATE_BUFFERS
    ]
    if hidden:
        raise ValueError(f"floating-point buffers cannot be scored (weights kept outside parameters?): {hidden}")


@torch.no_grad()
def audit(
    model: nn.Module,
    rule: str = "lab4",
    passes: int = 1,
    input_shape: tuple[int, ...] = (1, 3, 32, 32),
) -> Score:
    """Score ``model`` layer by layer, e.g. ``audit(create_model("resnet18")).score``.

    Runs one forward pass of a copy (quantizers that calibrate on first use stay untouched) and
    counts the operations of every call of every layer; a layer that never runs still stores its
    parameters. Pruning masks may be attached (masked weights count as zeros). Every parameter
    must belong to a conv, linear or norm layer, or the audit refuses, naming it.
    """
    if rule not in RULES:
        raise ValueError(f"unknown score rule {rule!r}; choose from {', '.join(RULES)}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    # A pruned layer's ``weight`` is computed (weight_orig * weight_mask) and cannot be deep-copied;
    # the copy leaves it out and gets it back from its own tensors.
    masked = [m for m in model.modules() if hasattr(m, "weight_mask")]
    model = copy.deepcopy(model, memo={id(m.weight): None for m in masked}).eval()
    for m in model.modules():
        if hasattr(m, "weight_mask"):
            m.weight = m.weight_orig * m.weight_mask
    costed = {n: m for n, m in model.named_modules() if isinstance(m, _COSTED)}
    _auditable(model, costed)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in costed}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls[name].append((inputs[0], output))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in costed.items()]
    param = next(model.parameters())
    model(torch.zeros(input_shape, device=param.device, dtype=param.dtype))
    for h in hooks:
        h.remove()
    r = RULES[rule]
    return Score(rule, passes, [_layer_cost(n, m, calls[n], r) for n, m in costed.items()])
