"""Pruning and quantization: functions over a model and a config (no optuna here)."""

from microsearch.compression._quant import (
    QUANT_LAYERS,
    LayerBits,
    QuantBatchNorm2d,
    QuantConfig,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    apply_quant_plan_,
    clamp_binary_weights_,
    compute_layers,
    current_plan,
    quant_plan,
    quantize_,
)

__all__ = [
    "QUANT_LAYERS",
    "LayerBits",
    "QuantBatchNorm2d",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "apply_quant_plan_",
    "clamp_binary_weights_",
    "compute_layers",
    "current_plan",
    "quant_plan",
    "quantize_",
]
