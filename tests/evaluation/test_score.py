import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from microsearch.compression import QuantConfig, quantize_
from microsearch.evaluation import RULES, audit
from microsearch.models import create_model


class Tiny(nn.Module):
    """conv 3->2 (3x3, no bias) -> BN -> pool -> linear 2->3, scored on a 1x3x4x4 input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


SHAPE = (1, 3, 4, 4)
# By hand: conv 2*4*4 = 32 outputs x (27 mults + 26 adds); BN 3 ops x 32 elements;
# linear 3 outputs x (2 mults + 1 add + 1 bias add).
CONV_MULTS, CONV_ADDS, BN_OPS, FC_MULTS, FC_ADDS = 32 * 27, 32 * 26, 96, 6, 6
PARAMS = 54 + 4 + 9


def test_hand_computed_counts_and_score():
    s = audit(Tiny(), input_shape=SHAPE)
    assert s.params == PARAMS
    assert s.ops == CONV_MULTS + CONV_ADDS + BN_OPS + FC_MULTS + FC_ADDS
    assert [layer.name for layer in s.layers] == ["conv", "bn", "fc"]
    assert s.score == pytest.approx(PARAMS / 5.6e6 + s.ops / 8.3e8)


def test_resnet18_reference_vectors_at_32_bits():
    s = audit(create_model("resnet18"))
    assert s.params == 11_173_962
    assert s.ops == 1_112_074_240


def test_resnet18_at_16_bits_micronet_is_exactly_the_reference():
    model = create_model("resnet18")
    quantize_(model, QuantConfig(weight_bits=16, act_bits=16))
    s = audit(model, rule="micronet")
    assert s.params_32bit == 5_586_981
    assert s.ops_32bit == 834_362_880
    assert s.score == pytest.approx(2.0, abs=1e-12)


def test_resnet18_at_16_bits_lab4_terms():
    model = create_model("resnet18")
    quantize_(model, QuantConfig(weight_bits=16, act_bits=16))
    s = audit(model, rule="lab4")
    assert s.param_term == pytest.approx(11_173_962 * 0.5 / 5.6e6)
    assert s.ops_term == pytest.approx(1_112_074_240 * 0.5 / 8.3e8)
    assert s.score == pytest.approx(1.668, abs=1e-3)


def test_half_model_counts_as_16_bits():
    model = Tiny().half()
    s = audit(model, rule="micronet", input_shape=SHAPE)
    assert {(layer.weight_bits, layer.act_bits) for layer in s.layers} == {(16, 16)}


def test_unstructured_zeros_lower_the_param_term_but_not_the_ops():
    model = Tiny()
    dense = audit(model, input_shape=SHAPE)
    with torch.no_grad():
        model.conv.weight.view(-1)[:20] = 0
    sparse = audit(model, input_shape=SHAPE)
    assert sparse.nonzero_params == dense.nonzero_params - 20
    assert sparse.param_term == pytest.approx(dense.param_term - 20 / 5.6e6)
    assert sparse.ops_term == dense.ops_term


def test_bits_are_read_from_the_quantizers_and_match_a_hand_computation():
    model = Tiny()
    quantize_(model, QuantConfig(weight_bits=4, act_bits=8))  # biases and BN at max(16, 4) = 16
    s = audit(model, input_shape=SHAPE)
    by_name = {layer.name: layer for layer in s.layers}
    assert (by_name["conv"].weight_bits, by_name["conv"].act_bits) == (4, 8)
    assert (by_name["bn"].weight_bits, by_name["bn"].bias_bits) == (16, 16)
    scales = 4  # learned step sizes of conv/fc weight (4-bit) and input (8-bit) quantizers
    params = (54 * 4 + 4 * 16 + 6 * 4 + 3 * 16) / 32 + scales
    ops = (CONV_MULTS + CONV_ADDS) * 8 / 32 + BN_OPS * 16 / 32 + (FC_MULTS + FC_ADDS) * 8 / 32
    assert s.params_32bit == pytest.approx(params)
    assert s.ops_32bit == pytest.approx(ops)
    assert s.score == pytest.approx(params / 5.6e6 + ops / 8.3e8)
    lower = Tiny()
    quantize_(lower, QuantConfig(weight_bits=2, act_bits=2))
    assert audit(lower, input_shape=SHAPE).score < s.score


def test_micronet_scales_only_multiplications():
    model = Tiny()
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8, bias_bits=16))
    s = audit(model, rule="micronet", input_shape=SHAPE)
    ops = (CONV_MULTS + FC_MULTS) * 8 / 32 + CONV_ADDS + FC_ADDS + BN_OPS
    assert s.ops_32bit == pytest.approx(ops)
    assert s.ops_term == pytest.approx(ops / RULES["micronet"].ops_ref)


def test_test_time_augmentation_passes_multiply_the_ops():
    one, two = audit(Tiny(), passes=1, input_shape=SHAPE), audit(Tiny(), passes=2, input_shape=SHAPE)
    assert two.ops == 2 * one.ops and two.ops_32bit == 2 * one.ops_32bit and two.params == one.params


def test_audit_does_not_touch_the_model():
    model = Tiny()
    quantize_(model, QuantConfig(4, 4))
    audit(model, input_shape=SHAPE)
    assert not bool(model.conv.act_quant.initialized)


def test_parameters_outside_known_layers_are_refused():
    model = Tiny()
    model.extra = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="extra"):
        audit(model, input_shape=SHAPE)


def test_bad_rule_and_passes():
    with pytest.raises(ValueError, match="rule"):
        audit(Tiny(), rule="flops", input_shape=SHAPE)
    with pytest.raises(ValueError, match="passes"):
        audit(Tiny(), passes=0, input_shape=SHAPE)


def test_the_committed_score_map_is_what_the_audit_computes_today():
    script = Path(__file__).parents[2] / "benchmarks" / "frontier.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class Reused(Tiny):
    """Tiny with its conv applied twice (a 2->2 conv shares the weights) and a layer that never runs."""

    def __init__(self):
        super().__init__()
        self.again = nn.Conv2d(2, 2, 1, bias=False)
        self.unused = nn.Linear(2, 5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.fc(self.again(self.again(y)).mean((2, 3)))


def test_every_call_of_a_layer_is_counted_and_layers_that_never_run_keep_their_parameters():
    s = audit(Reused(), input_shape=SHAPE)
    again = next(layer for layer in s.layers if layer.name == "again")
    assert (again.params, again.mult_ops, again.add_ops) == (4, 2 * 32 * 2, 2 * 32 * 1)  # two calls of 32 outputs
    unused = next(layer for layer in s.layers if layer.name == "unused")
    assert (unused.params, unused.mult_ops, unused.add_ops) == (15, 0, 0)
    assert s.params == PARAMS + 4 + 15
    assert s.ops == CONV_MULTS + CONV_ADDS + BN_OPS + FC_MULTS + FC_ADDS + 2 * 32 * 3


def test_weights_kept_in_buffers_are_refused_by_name():
    class Functional(Tiny):
        def __init__(self):
            super().__init__()
            self.register_buffer("hidden", torch.ones(2, 2))

        def forward(self, x):
            return super().forward(x) @ torch.ones(3, 2) @ self.hidden

    with pytest.raises(ValueError, match=r"floating-point buffers cannot be scored .*\['hidden'\]"):
        audit(Functional(), input_shape=SHAPE)


def test_a_float64_model_counts_64_bits():
    single, double = audit(Tiny(), input_shape=SHAPE), audit(Tiny().double(), input_shape=SHAPE)
    assert {(layer.weight_bits, layer.act_bits) for layer in double.layers} == {(64, 64)}
    assert double.param_term == pytest.approx(2 * single.param_term)
    assert double.ops_term == pytest.approx(2 * single.ops_term)


def test_attached_pruning_masks_count_masked_weights_as_zeros():
    from torch.nn.utils import prune

    model = Tiny()
    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    masked = audit(model, input_shape=SHAPE)
    assert next(layer for layer in masked.layers if layer.name == "conv").nonzero == 27  # 54 weights, half zeroed
    assert hasattr(model.conv, "weight_mask")  # the model is left as it was
    prune.remove(model.conv, "weight")
    assert audit(model, input_shape=SHAPE).to_dict() == masked.to_dict()
