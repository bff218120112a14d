import pytest
import torch

from microsearch.models import ResNetConfig, create_model, list_models, model_spec

# Parameter counts of the presets (ResNet18 is the kuangliu CIFAR reference, DESIGN.md).
PARAMS = {
    "resnet": 272_474,
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
    "resnet18": 11_173_962,
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
