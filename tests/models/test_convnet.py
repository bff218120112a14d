import json

import torch

from microsearch.cli import main
from microsearch.compression import li_prune
from microsearch.evaluation import audit
from microsearch.models import create_model, model_spec


def _layer(score, name):
    return next(layer for layer in score.layers if layer.name == name)


def test_groups_pool_after_their_first_conv_and_are_audited_by_hand():
    model = create_model("convnet", widths=(4, 8), stem=2).eval()
    score = audit(model)
    assert [layer.name for layer in score.layers if layer.kind == "Conv2d"] == [
        "stem.0",
        "groups.0.conv1.0",
        "groups.0.conv2.0",
        "groups.1.conv1.0",
        "groups.1.conv2.0",
    ]
    # A group's first conv runs at its input's side, its norm and second conv at half of it.
    assert _layer(score, "groups.0.conv1.0").mult_ops == 4 * 32 * 32 * 9 * 2
    assert _layer(score, "groups.0.conv1.2").add_ops == 3 * 4 * 16 * 16
    assert _layer(score, "groups.0.conv2.0").mult_ops == 4 * 16 * 16 * 9 * 4
    assert _layer(score, "groups.1.conv1.0").mult_ops == 8 * 16 * 16 * 9 * 4
    assert _layer(score, "groups.1.conv2.0").mult_ops == 8 * 8 * 8 * 9 * 8
    assert (_layer(score, "fc").params, _layer(score, "fc").mult_ops) == (8 * 10 + 10, 8 * 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_filter_pruning_keeps_the_largest_filters_of_each_group():
    torch.manual_seed(0)
    model = create_model("convnet", widths=(8, 16), stem=4)
    for group in model.groups:  # distinct statistics, so a wrong slice shows
        group.conv1[2].running_var.copy_(torch.arange(1.0, group.conv1[2].num_features + 1))
    smaller = li_prune(model, 0.5)
    assert model_spec(smaller)["config"]["mid_channels"] == (4, 8)
    for big, small in zip(model.groups, smaller.groups):
        keep = big.conv1[0].weight.abs().flatten(1).sum(1).topk(small.conv1[0].out_channels).indices.sort().values
        assert torch.equal(small.conv1[0].weight, big.conv1[0].weight[keep])
        assert torch.equal(small.conv1[2].running_var, big.conv1[2].running_var[keep])  # its norm goes with it
        assert torch.equal(small.conv2[0].weight, big.conv2[0].weight[:, keep])
    assert smaller(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_quantized_convnet_trains_saves_and_rescores(capsys, tmp_path):
    args = ["train", "--data", "synthetic:600", "--val-size", "100", "--model", "convnet", "--epochs", "1"]
    args += ["--model-arg", "widths=8,16", "--model-arg", "stem=4", "--batch-size", "100"]
    args += ["--weight-bits", "4", "--act-bits", "4", "--compile", "off", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["score", str(tmp_path / "model.pt"), "--json"]) == 0
    rescore = json.loads(capsys.readouterr().out)
    assert rescore["score"] == summary["score"]
    inner = [layer for layer in rescore["layers"] if layer["kind"] == "QuantConv2d"][1:]
    assert len(inner) == 4 and {(layer["weight_bits"], layer["act_bits"]) for layer in inner} == {(4, 4)}
