import pytest
import torch
from torch import nn

from microsearch.compression import (
    QuantConfig,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    clamp_binary_weights_,
    current_plan,
    quant_plan,
    quantize_,
)
from microsearch.models import create_model


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_b_bit_weights_take_at_most_2_to_the_b_values_and_pass_gradients(bits):
    q = Quantizer(bits, signed=True)
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    out = q(w)
    assert out.unique().numel() <= 2**bits
    assert out.unique().numel() >= min(2**bits, 2)
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    if q.scale is not None:
        assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_16_bits_is_half_precision_rounding():
    x = torch.randn(1000) * 100
    assert torch.equal(Quantizer(16)(x), x.half().float())
    assert torch.equal(Quantizer(32)(x), x)


def test_activation_quantizer_picks_unsigned_levels_for_nonnegative_inputs():
    q = Quantizer(4, signed=None)
    out = q(torch.rand(100, 16))  # post-ReLU-like inputs
    assert not bool(q.signed)
    assert out.min() >= 0 and out.unique().numel() <= 16


def test_binary_connect_is_sign_and_clamps_latent_weights():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, QuantConfig(weight_bits=1, act_bits=8))
    layer = model[0]
    assert set(layer.weight_quant(layer.weight).unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        layer.weight.mul_(10)
    clamp_binary_weights_(model)
    assert layer.weight.abs().max() <= 1


def test_quantize_swaps_layers_in_place_and_keeps_parameters():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8))
    assert isinstance(model.stem[0], QuantConv2d) and isinstance(model.fc, QuantLinear)
    for name, p in before.items():
        assert torch.equal(model.get_parameter(name), p)
    assert model(x).shape == (2, 10)


def test_first_and_last_layer_keep_more_bits():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    plan = quant_plan(model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=8))
    assert plan["stem.0"]["weight"] == 8 and plan["fc"]["act"] == 8
    assert plan["stages.0.0.conv1.0"] == {"weight": 2, "act": 4, "bias": 16}
    quantize_(model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=8))
    assert current_plan(model) == plan


def test_per_layer_overrides_and_their_errors():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    plan = quant_plan(model, QuantConfig(4, 4, layer_bits={"stages.1.0.conv2.0": (3, 5)}))
    assert plan["stages.1.0.conv2.0"]["weight"] == 3 and plan["stages.1.0.conv2.0"]["act"] == 5
    with pytest.raises(ValueError, match="unknown layers"):
        quant_plan(model, QuantConfig(4, 4, layer_bits={"nope": (4, 4)}))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"weight_bits": 9}, "weight_bits"), ({"act_bits": 1}, "act_bits"), ({"bias_bits": 4}, "bias_bits")],
)
def test_invalid_bits_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantConfig(**kwargs)


def test_quantization_aware_training_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :4].argmax(1)  # a learnable rule
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_loading_a_state_dict_replaces_cached_levels():
    calibrated = Quantizer(4, signed=None)
    calibrated(torch.rand(64))  # non-negative: unsigned levels 0..15
    other = Quantizer(4, signed=None)
    other(-torch.rand(64))  # negative: signed levels, cached on the host
    other.load_state_dict(calibrated.state_dict())
    x = torch.rand(64) * 3
    assert torch.equal(other(x), calibrated(x))
    assert other(x).min() >= 0
