import json

import pytest
import torch

from microsearch import code_version
from microsearch.checkpoint import load_model, save_model
from microsearch.cli import main
from microsearch.compression import current_plan, weight_levels
from microsearch.evaluation import audit
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.train import evaluate
from microsearch.models import Ensemble, create_model, same_layers
from tests.helpers import assert_started_from


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_score_reproduces_the_micronet_reference(capsys):
    code, out, _ = _run(
        capsys,
        "score",
        "--model",
        "resnet18",
        "--weight-bits",
        "16",
        "--act-bits",
        "16",
        "--rule",
        "micronet",
        "--json",
    )
    result = json.loads(out)
    assert code == 0
    assert result["params_32bit"] == 5_586_981 and result["ops_32bit"] == 834_362_880
    assert result["score"] == pytest.approx(2.0)
    assert result["nonzero_params"] == 11_173_962
    assert len(result["layers"]) == 41  # 20 convs (3 of them shortcuts), 20 BatchNorms, 1 linear
    assert {"name", "params", "nonzero", "weight_bits", "act_bits", "mult_ops"} <= set(result["layers"][0])


def test_score_lab4_table(capsys):
    code, out, _ = _run(capsys, "score", "--model", "resnet18", "--weight-bits", "16", "--act-bits", "16")
    assert code == 0
    assert "= 1.6676" in out and "stem.0" in out


def test_train_writes_a_model_whose_rescore_matches(capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "train",
        "--data",
        "synthetic:1200",
        "--val-size",
        "200",
        "--model",
        "resnet",
        "--model-arg",
        "width=4",
        "--model-arg",
        "blocks=1,1,1",
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--weight-bits",
        "4",
        "--act-bits",
        "8",
        "--tta",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert "epoch 2/2" in err and "val" in err and "eta" in err
    assert summary["passes"] == 2
    # the reported accuracy is the saved model's, on the held-out images, with both passes
    code, out, _ = _run(
        capsys, "evaluate", str(tmp_path / "model.pt"), "--data", "synthetic:1200", "--split", "val", "--tta", "--json"
    )
    assert code == 0 and json.loads(out)["accuracy"] == summary["val_acc"] and json.loads(out)["images"] == 200
    code, out, _ = _run(capsys, "score", str(tmp_path / "model.pt"), "--json")
    rescore = json.loads(out)
    assert rescore["score"] == summary["score"] and rescore["passes"] == 2
    assert {layer["weight_bits"] for layer in rescore["layers"] if layer["kind"] == "QuantConv2d"} == {4}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["train", "--data", "imagefolder:/nope", "--model", "resnet", "--epochs", "1", "--out", "x"],
            "/nope does not exist",
        ),
        (
            [
                "train",
                "--data",
                "synthetic",
                "--model",
                "resnet",
                "--model-arg",
                "depth=3",
                "--epochs",
                "1",
                "--out",
                "x",
            ],
            "depth",
        ),
        (
            [
                "train",
                "--data",
                "synthetic",
                "--model",
                "resnet",
                "--epochs",
                "1",
                "--out",
                "x",
                "--set",
                "cutout=99",
            ],
            "TrainConfig.cutout",
        ),
        (["train", "--data", "synthetic", "--epochs", "1", "--out", "x"], "train needs --model NAME, or --init"),
        (["score", "--model", "resnet", "--weight-bits", "12"], "weight_bits"),
        (["score"], "give either a model file or --model"),
    ],
)
def test_bad_input_fails_with_one_line_before_training(capsys, argv, needle):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert "epoch" not in err


def _image_tree(root, classes: int, per_class: int, test: bool = False) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test") if test else ("train",):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")


@pytest.mark.filterwarnings("ignore:.*no native bf16")  # where the CPU emulates bf16
def test_evaluate_measures_a_split_and_scores_the_passes_it_used(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "synthetic:600",
                "--val-size",
                "100",
                "--model",
                "resnet",
                "--model-arg",
                "width=4",
                "--epochs",
                "1",
                "--batch-size",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    model, _ = load_model(out / "model.pt")
    data = load_data(DataConfig("synthetic:600", val_size=100))
    code, text, _ = _run(capsys, "evaluate", str(out / "model.pt"), "--data", "synthetic:600", "--json")
    result = json.loads(text)
    assert code == 0 and result["split"] == "test" and result["images"] == len(data.test) == 120
    assert result["accuracy"] == evaluate(model, data.test, torch.device("cpu")).accuracy
    assert result["score"] == pytest.approx(audit(model).score)
    code, text, _ = _run(
        capsys, "evaluate", str(out / "model.pt"), "--data", "synthetic:600", "--split", "val", "--tta", "--json"
    )
    tta = json.loads(text)
    assert tta["images"] == 100 and tta["passes"] == 2
    assert tta["ops_term"] == pytest.approx(2 * result["ops_term"])  # both passes are scored
    # By default a file is evaluated in the precision its accuracy was measured in (a float layer in
    # bf16 rounds its output), unless the CPU only emulates bf16; --precision overrides it.
    model_meta = load_model(out / "model.pt")[1]
    save_model(out / "bf16.pt", model, {**model_meta, "precision": "bf16"})
    argv = ["evaluate", str(out / "bf16.pt"), "--data", "synthetic:600", "--json"]
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("microsearch.evaluation.train._cpu_runs_bf16", lambda native=native: native)
        code, text, err = _run(capsys, *argv)
        result = json.loads(text)
        assert code == 0 and result["precision"] == expected
        assert result["accuracy"] == evaluate(model, data.test, torch.device("cpu"), precision=expected).accuracy
        assert ("was measured in bf16, which cpu" in err) == (not native)
    code, text, err = _run(capsys, *argv, "--precision", "bf16")
    assert code == 0 and json.loads(text)["precision"] == "bf16" and "measured in bf16" not in err
    monkeypatch.undo()
    code, text, _ = _run(capsys, *argv, "--precision", "fp32")
    fp32 = json.loads(text)
    assert code == 0 and fp32["precision"] == "fp32"
    assert fp32["accuracy"] == evaluate(model, data.test, torch.device("cpu"), precision="fp32").accuracy
    # Several files: their ensemble (mean logits), scored as all of its members together
    model_b = create_model("resnet", width=2, blocks=(1, 1, 1))
    save_model(out / "b.pt", model_b, model_meta)
    argv = ["evaluate", str(out / "model.pt"), str(out / "b.pt"), "--data", "synthetic:600", "--split", "val"]
    code, text, _ = _run(capsys, *argv, "--precision", "fp32", "--json")
    both = json.loads(text)
    ensemble = Ensemble([model, model_b])
    assert code == 0 and both["model_file"] == f"{out / 'model.pt'} + {out / 'b.pt'}"
    assert both["accuracy"] == evaluate(ensemble, data.val, torch.device("cpu"), precision="fp32").accuracy
    assert both["score"] == pytest.approx(audit(model).score + audit(model_b).score)
    assert "(the mean logits of 2 models)" in _run(capsys, *argv)[1]
    save_model(out / "c.pt", model_b, {**model_meta, "data": {**model_meta["data"], "val_size": 50}})
    code, _, err = _run(capsys, *argv[:2], str(out / "c.pt"), *argv[3:])
    assert code == 2 and "held out different validation images" in err
    _image_tree(tmp_path / "three", classes=3, per_class=40)
    code, _, err = _run(
        capsys, "evaluate", str(out / "model.pt"), "--data", f"imagefolder:{tmp_path / 'three'}", "--split", "val"
    )
    assert code == 2 and "has 3 classes but the model predicts 10" in err
    _image_tree(tmp_path / "ten", classes=10, per_class=11)
    code, _, err = _run(capsys, "evaluate", str(out / "model.pt"), "--data", f"imagefolder:{tmp_path / 'ten'}")
    assert code == 2 and "has no test split; use --split val" in err


def test_train_init_starts_from_a_float_or_quantized_model_requantizes_and_refuses_others(capsys, tmp_path):
    base = ["train", "--data", "synthetic:300", "--val-size", "100", "--model", "resnet", "--model-arg", "width=4"]
    base += ["--model-arg", "blocks=1,1,1", "--batch-size", "50", "--epochs", "1"]
    assert main([*base, "--out", str(tmp_path / "float")]) == 0
    start = str(tmp_path / "float" / "model.pt")
    quantized = [*base, "--weight-bits", "4", "--act-bits", "4", "--first-last-bits", "8", "--lr", "1e-6"]
    assert main([*quantized, "--init", start, "--out", str(tmp_path / "q")]) == 0
    init, _ = load_model(start)
    tuned, meta = load_model(tmp_path / "q" / "model.pt")
    assert meta["init"] == start and meta["train"]["float_warmup"] is False
    assert_started_from(tuned, init)
    q_start = str(tmp_path / "q" / "model.pt")  # a quantized model trains on at its own bits
    assert main([*base, "--lr", "1e-6", "--init", q_start, "--out", str(tmp_path / "qq")]) == 0
    again, meta = load_model(tmp_path / "qq" / "model.pt")
    assert meta["init"] == q_start and current_plan(again) == current_plan(tuned)
    weight_bits = [bits["weight"] for bits in current_plan(again).values()]
    assert sorted(set(weight_bits)) == [4, 8, 16]  # convs and the linear layer; BatchNorm at 16 bits
    steps = {n: b for n, b in tuned.state_dict().items() if n.endswith("weight_quant.scale")}
    assert len(steps) == sum(b <= 8 for b in weight_bits) and all(b.item() > 0 for b in steps.values())
    for name, step in steps.items():  # trained on from the stored steps and weights, not calibrated again
        torch.testing.assert_close(again.state_dict()[name], step, rtol=1e-3, atol=0, msg=name)
        weight = name.removesuffix("_quant.scale")
        torch.testing.assert_close(again.state_dict()[weight], tuned.state_dict()[weight], rtol=0, atol=step.item() / 2)
    three = [*base, "--weight-bits", "3", "--act-bits", "3", "--first-last-bits", "8", "--lr", "1e-6"]
    assert main([*three, "--init", q_start, "--out", str(tmp_path / "q3")]) == 0  # progressive: 4 -> 3 bits
    lower, meta = load_model(tmp_path / "q3" / "model.pt")
    assert meta["init"] == q_start and meta["train"]["float_warmup"] is False
    assert sorted({bits["weight"] for bits in current_plan(lower).values()}) == [3, 8, 16]
    assert sorted({bits["act"] for bits in current_plan(lower).values()}) == [3, 8, 16]
    for name, step in steps.items():  # calibrated again at 3 bits, from the 4-bit model's weights
        b = current_plan(lower)[name.removesuffix(".weight_quant.scale")]["weight"]
        if b == 3:
            assert lower.state_dict()[name].item() > step.item() * 1.3  # 3 levels a side instead of 7
        weight, new_step = name.removesuffix("_quant.scale"), lower.state_dict()[name].item()
        inside = tuned.state_dict()[weight].abs() <= (2 ** (b - 1) - 1) * new_step  # not clipped at the new bits
        moved = (lower.state_dict()[weight] - tuned.state_dict()[weight]).abs()
        assert inside.float().mean() > 0.95 and bool((moved[inside] <= new_step / 2 + 1e-6).all()), name
    unquantized = [*base, "--weight-bits", "32", "--act-bits", "32", "--lr", "1e-6"]
    assert main([*unquantized, "--init", q_start, "--out", str(tmp_path / "f")]) == 0  # back to float
    back, _ = load_model(tmp_path / "f" / "model.pt")
    assert current_plan(back) == {} and same_layers(back, init)  # a float network: it can start a study
    for name in steps:
        weight = name.removesuffix("_quant.scale")
        torch.testing.assert_close(back.state_dict()[weight], tuned.state_dict()[weight], rtol=0, atol=1e-4)
    capsys.readouterr()
    other = "does not have the layers of this --model and --model-arg"
    refusals = [
        ([*three, "--model-arg", "width=8", "--init", q_start], other),
        ([*base, "--model-arg", "width=8", "--init", start], other),
        ([*base, "--model-arg", "width=8", "--init", q_start], other),
        ([*base, "--val-size", "50", "--init", start], f"--init {start} was trained on"),  # saw these val images
    ]
    for argv, message in refusals:
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_train_init_with_layer_bits_requantizes_only_the_layers_it_names(capsys, tmp_path):
    base = ["train", "--data", "synthetic:300", "--val-size", "100", "--model", "resnet", "--model-arg", "width=4"]
    base += ["--model-arg", "blocks=1,1,1", "--batch-size", "50", "--epochs", "1"]
    q4 = ["--weight-bits", "4", "--act-bits", "4", "--first-last-bits", "8"]
    assert main([*base, *q4, "--out", str(tmp_path / "q4")]) == 0
    start = str(tmp_path / "q4" / "model.pt")
    argv = [*base, "--lr", "1e-6", "--init", start, "--layer-bits", "stages.2=3/3", "--out", str(tmp_path / "s2")]
    assert main(argv) == 0
    before, _ = load_model(start)
    after, meta = load_model(tmp_path / "s2" / "model.pt")
    assert meta["init"] == start
    changed = {n: b for n, b in current_plan(after).items() if b != current_plan(before)[n]}
    stage = ("stages.2.0.conv1.0", "stages.2.0.conv2.0", "stages.2.0.shortcut.0")
    assert changed == {n: {"weight": 3, "act": 3, "bias": 16} for n in stage}
    for name, step in before.state_dict().items():
        if name.endswith("weight_quant.scale"):
            new = after.state_dict()[name].item()
            if name.startswith(stage):
                assert new > 1.3 * step.item(), name  # calibrated again at 3 bits
            else:
                assert new == pytest.approx(step.item(), rel=1e-3), name  # trained on from its stored step
    capsys.readouterr()
    code, _, err = _run(capsys, "score", start, "--layer-bits", "stages.2=3/3")
    assert code == 2 and "apply to --model, not to a model file" in err
    code, _, err = _run(capsys, "score", "--model", "resnet20", "--weight-bits", "4", "--layer-bits", "stages.2=3")
    assert code == 2 and "--layer-bits 'stages.2=3' is not of the form NAME=W/A" in err
    code, _, err = _run(capsys, "score", "--model", "resnet20", "--weight-bits", "4", "--layer-bits", "stage.2=3/3")
    assert code == 2 and "layer_bits names unknown layers ['stage.2']" in err


def test_sweep_saves_pruned_models_that_train_init_continues_without_model_args(capsys, tmp_path):
    base = ["--data", "synthetic:300", "--val-size", "100"]
    q4 = ["--model", "resnet", "--model-arg", "width=4", "--model-arg", "blocks=1,1,1", "--weight-bits", "4"]
    q4 += ["--act-bits", "4", "--epochs", "1", "--batch-size", "50"]
    assert main(["train", *base, *q4, "--out", str(tmp_path)]) == 0
    start = str(tmp_path / "model.pt")
    capsys.readouterr()
    sweep = ["sweep", start, "--data", "synthetic:300", "--method", "li", "--ratios", "0.5", "--save"]
    sweep += ["--finetune-epochs", "1", "--finetune-lr", "0.05", "--precision", "fp32"]
    assert main([*sweep, "--out", str(tmp_path / "li"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model_file"] == str(tmp_path / "li" / "models" / "li-0.5.pt")
    pruned, meta = load_model(row["model_file"])
    # Fine-tuned, then snapped: every conv and linear weight (stem, 3 x 2 convs, 2 shortcuts, fc) is
    # its 4-bit levels, so the row counted the weights that round to zero as zeros.
    assert len(weight_levels(pruned)) == 10
    assert pruned.config.mid_channels == (2, 4, 8)  # half of each block's 4, 8, 16 inner filters
    assert (meta["val_acc"], meta["score"], meta["pruned_from"]) == (row["val_acc"], row["score"], start)
    assert (meta["data"], meta["passes"], meta["precision"]) == (load_model(start)[1]["data"], 1, "fp32")
    score = audit(pruned, meta["rule"], passes=meta["passes"])
    assert (score.score, score.params, score.nonzero_params) == (row["score"], row["params"], row["nonzero_params"])
    data = load_data(DataConfig("synthetic:300", val_size=100))
    assert evaluate(pruned, data.val, torch.device("cpu")).accuracy == row["val_acc"]
    # Its own network, bits and step sizes: no --model, --model-arg or --*-bits to retype.
    out = tmp_path / "ft"
    argv = ["train", *base, "--init", row["model_file"], "--epochs", "1", "--batch-size", "50", "--lr", "1e-6"]
    assert main([*argv, "--out", str(out)]) == 0
    after, after_meta = load_model(out / "model.pt")
    assert after.config == pruned.config and after_meta["model"] == "resnet"
    assert current_plan(after) == current_plan(pruned)
    assert audit(after).params == score.params
    capsys.readouterr()
    code, _, err = _run(capsys, *argv, "--model-arg", "width=8", "--out", str(tmp_path / "x"))
    assert code == 2 and "--model-arg needs --model; without it, the network is the --init model's own" in err


def test_a_command_reads_the_code_version_when_it_starts(capsys):
    # Cards written hours later must name the commit this process loaded, not the checkout's by then.
    code_version.cache_clear()
    assert main(["score", "--model", "resnet", "--model-arg", "width=2", "--json"]) == 0
    assert code_version.cache_info().currsize == 1
