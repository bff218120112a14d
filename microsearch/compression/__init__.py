"""Pruning and quantization: functions over a model and a config (no optuna, no training loop).

Methods that retrain between steps take the retraining as a ``finetune(model)`` callable.
"""

from microsearch.compression._filters import (
    channel_contributions,
    filter_l1,
    li_keep,
    li_prune,
    remove_channels,
    sensitivity,
    thinet_prune,
    thinet_select,
)
from microsearch.compression._prune import (
    L1,
    Criterion,
    RandomCriterion,
    han_prune_,
    make_permanent_,
    prunable_layers,
    prune_global_,
    prune_layers_,
    sparsity,
)
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
    "L1",
    "QUANT_LAYERS",
    "Criterion",
    "LayerBits",
    "QuantBatchNorm2d",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "RandomCriterion",
    "apply_quant_plan_",
    "channel_contributions",
    "clamp_binary_weights_",
    "compute_layers",
    "current_plan",
    "filter_l1",
    "han_prune_",
    "li_keep",
    "li_prune",
    "make_permanent_",
    "prunable_layers",
    "prune_global_",
    "prune_layers_",
    "quant_plan",
    "quantize_",
    "remove_channels",
    "sensitivity",
    "sparsity",
    "thinet_prune",
    "thinet_select",
]
