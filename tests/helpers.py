import torch
from torch import nn


def assert_started_from(trained: nn.Module, start: nn.Module) -> None:
    """``trained`` (quantized, barely trained) holds ``start``'s weights: each within half its
    quantizer's step, since a trained model's weights are snapped to their quantized values."""
    for name, weight in start.named_parameters():
        layer = trained.get_submodule(name.rpartition(".")[0])
        quantizer = layer.weight_quant if name.endswith(".weight") else layer.bias_quant
        half_step = 0 if quantizer.scale is None else quantizer.scale.detach().abs().item() / 2
        torch.testing.assert_close(trained.get_parameter(name), weight, atol=half_step + 1e-4, rtol=0, msg=name)
