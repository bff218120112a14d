import subprocess
import sys

import pytest
import torch
from torch import nn

from microsearch.compression import li_prune
from microsearch.evaluation import audit
from microsearch.models import ResNetConfig, create_model, list_models, model_spec

# Parameter counts of the presets (ResNet18 is the kuangliu CIFAR reference, docs/design.md).
PARAMS = {
    "resnet": 272_474,
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
    "resnet18": 11_173_962,
    "convnet": 1_978_026,  # 32 -> 64 -> 256 -> 256 channels
}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_and_has_documented_size(name):
    model = create_model(name).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_width_depth_and_block_change_the_network():
    base = create_model("resnet", width=8, blocks=(1, 1, 1))
    wider = create_model("resnet", width=16, blocks=(1, 1, 1))
    deeper = create_model("resnet", width=8, blocks=(2, 2, 2))
    separable = create_model("resnet", width=8, blocks=(1, 1, 1), block="dwsep")

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(wider) > count(base) and count(deeper) > count(base)
    assert count(separable) < count(base) / 2
    assert separable(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mid_channels_shrink_only_the_inner_convolutions():
    model = create_model("resnet", width=8, blocks=(1, 1, 1), mid_channels=(3, 5, 7))
    block = model.stages[1][0]
    assert block.conv1[0].out_channels == 5
    assert block.conv2[0].in_channels == 5
    assert block.conv2[0].out_channels == 16
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_spec_rebuilds_the_same_architecture():
    model = create_model("resnet32", width=4)
    spec = model_spec(model)
    assert spec["name"] == "resnet" and spec["config"]["blocks"] == (5, 5, 5)
    clone = create_model(spec["name"], **spec["config"])
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"block": "huge"}, "block"),
        ({"blocks": (1, 1)}, "one entry per stage"),
        ({"width": 0}, "width"),
        ({"mid_channels": (1, 2)}, "mid_channels"),
        ({"depth": 3}, "depth"),
    ],
)
def test_bad_config_is_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        create_model("resnet", **kwargs)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("vgg")


def test_config_accepts_lists_from_files():
    assert ResNetConfig(blocks=[1, 2, 3], multipliers=[1, 2, 4]).blocks == (1, 2, 3)


def _layer(score, name):
    return next(layer for layer in score.layers if layer.name == name)


@pytest.mark.parametrize(
    ("stem", "stem_in", "stem_side"),
    [("conv", 3, 32), ("stride2", 3, 16), ("s2d", 12, 16)],
)
def test_stems_set_the_resolution_of_every_stage_and_are_audited_by_hand(stem, stem_in, stem_side):
    model = create_model("resnet", width=4, blocks=(1, 1, 1), stem=stem).eval()
    score = audit(model)
    conv = _layer(score, "stem.0")
    n = 4 * stem_side * stem_side  # stem outputs
    k = 9 * stem_in
    assert (conv.params, conv.mult_ops, conv.add_ops) == (4 * k, n * k, n * (k - 1))
    # The first stage runs at the stem's resolution, each later stage at half of the one before.
    for s, side in enumerate((stem_side, stem_side // 2, stem_side // 4)):
        c = 4 * 2**s
        inner = _layer(score, f"stages.{s}.0.conv2.0")
        assert inner.mult_ops == c * side * side * 9 * c
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_early_downsampling_cuts_the_stage_operations_by_four():
    full = audit(create_model("resnet20")).ops
    cheap = audit(create_model("resnet20", stem="stride2")).ops
    stem_ops = audit(create_model("resnet20")).layers[0].mult_ops
    assert cheap < full / 3.9 and cheap > (full - stem_ops) / 4 * 0.99


def test_inverted_residual_block_counts_by_hand():
    # width 4, one block per stage, expansion 3: stage 1 (stride 2) is 4 -> 24 -> 8 channels.
    model = create_model("resnet", width=4, blocks=(1, 1, 1), block="mbconv", expansion=3).eval()
    score = audit(model)
    block = model.stages[1][0]
    assert (block.pw1[0].out_channels, block.dw[0].groups, block.pw2[0].out_channels) == (24, 24, 8)
    assert block.producer is block.pw1[0] and block.consumer is block.pw2[0]
    expand = _layer(score, "stages.1.0.pw1.0")
    depthwise = _layer(score, "stages.1.0.dw.0")
    project = _layer(score, "stages.1.0.pw2.0")
    assert (expand.params, expand.mult_ops) == (4 * 24, 24 * 32 * 32 * 4)  # expands at full size
    assert (depthwise.params, depthwise.mult_ops) == (24 * 9, 24 * 16 * 16 * 9)  # strides
    assert (project.params, project.mult_ops) == (24 * 8, 8 * 16 * 16 * 24)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_filter_pruning_shrinks_the_inverted_residual_middle():
    model = create_model("resnet", width=4, blocks=(1, 1, 1), block="mbconv", expansion=2)
    smaller = li_prune(model, 0.5)
    block = smaller.stages[2][0]
    assert (block.pw1[0].out_channels, block.dw[0].in_channels, block.pw2[0].in_channels) == (16, 16, 16)
    assert smaller(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fractional_stage_multipliers_round_the_channels():
    model = create_model("resnet", width=10, blocks=(1, 1, 1), multipliers=(1, 1.5, 3.25))
    assert [stage[0].conv2[0].out_channels for stage in model.stages] == [10, 15, 32]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(("kwargs", "needle"), [({"stem": "pool"}, "stem"), ({"expansion": 0}, "expansion")])
def test_bad_stem_and_expansion_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        create_model("resnet", **kwargs)


def test_a_strided_shortcut_is_a_strided_1x1_conv_in_values_and_gradients():
    torch.manual_seed(0)
    shortcut = create_model("resnet", width=4, blocks=(1, 1, 1)).stages[1][0].shortcut.double()
    conv, norm = shortcut
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (1, 1))
    reference = nn.Conv2d(4, 8, 1, stride=2, bias=False).double()
    reference.weight.data.copy_(conv.weight.data)
    for side in (16, 15):  # even and odd inputs: the strided conv's output size
        x = torch.randn(2, 4, side, side, dtype=torch.float64, requires_grad=True)
        shortcut(x).square().sum().backward()
        grad_x, grad_w = x.grad, conv.weight.grad
        x.grad = conv.weight.grad = None
        norm(reference(x)).square().sum().backward()
        torch.testing.assert_close(shortcut(x), norm(reference(x)))
        torch.testing.assert_close(grad_x, x.grad)
        torch.testing.assert_close(grad_w, reference.weight.grad)
        conv.weight.grad = reference.weight.grad = None


def test_a_narrow_strided_shortcut_trains_in_channels_last_on_the_cpu():
    # oneDNN's strided 1x1 weight gradient hangs, crashes or errs for channels_last inputs narrower
    # than its block on x86 CPUs; a child process turns a hang or a crash into a failure. The float32
    # channels_last gradients must match those of a float64 strided conv in the default layout.
    code = """
import copy, torch
from microsearch.models import create_model
torch.manual_seed(0)
shortcut = create_model("resnet", width=4, blocks=(1, 1, 1)).stages[1][0].shortcut
conv64 = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False).double()
conv64.weight.data.copy_(shortcut[0].weight.data)
norm64 = copy.deepcopy(shortcut[1]).double()
x, g = torch.randn(64, 4, 32, 32), torch.randn(64, 8, 16, 16)
x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
shortcut.to(memory_format=torch.channels_last)(x_cl).backward(g)
x64 = x.double().requires_grad_()
norm64(conv64(x64)).backward(g.double())
pairs = (x_cl.grad, x64.grad), (shortcut[0].weight.grad, conv64.weight.grad)
print(max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert float(done.stdout) < 1e-4
