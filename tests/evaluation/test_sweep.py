import csv
import json
from dataclasses import asdict

import pytest
import torch

from microsearch.checkpoint import load_model, save_model
from microsearch.cli import main
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.score import audit
from microsearch.evaluation.sweep import SweepContext, finetune_config, run_sweep, save_rows
from microsearch.evaluation.train import TrainConfig, evaluate
from microsearch.models import create_model

CPU = torch.device("cpu")
DATA = DataConfig("synthetic:600", val_size=100)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model.pt"
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    meta = {"data": asdict(DATA), "train": asdict(TrainConfig(epochs=1, batch_size=50)), "passes": 1}
    save_model(path, model, meta)
    return path


@pytest.fixture(scope="module")
def ctx():
    return SweepContext(load_data(DATA), None, CPU, tta=False)


def test_unstructured_sweep_meets_each_ratio_and_lowers_the_score(model_file, ctx):
    rows = run_sweep(model_file, "global", [0.0, 0.5, 0.9], ctx, log=lambda _: None)
    assert [r["ratio"] for r in rows] == [0.0, 0.5, 0.9]
    assert [round(r["sparsity"], 3) for r in rows] == [0.0, 0.5, 0.9]
    assert rows[0]["score"] > rows[1]["score"] > rows[2]["score"]
    assert rows[0]["ops"] == rows[2]["ops"]  # zeros do not remove operations
    # no pruning, no retraining: the saved model's own accuracy
    model, _ = load_model(model_file)
    assert rows[0]["val_acc"] == evaluate(model, ctx.data.val, CPU).accuracy


def test_structured_sweep_shrinks_parameters_and_operations(model_file, ctx):
    rows = run_sweep(model_file, "thinet", [0.0, 0.5], ctx, log=lambda _: None)
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["ops"] < rows[0]["ops"]
    assert rows[1]["sparsity"] == 0.0


def test_han_retrains_between_steps(model_file, ctx):
    retraining = SweepContext(ctx.data, TrainConfig(epochs=1, batch_size=100), CPU, tta=False)
    (row,) = run_sweep(model_file, "han", [0.6], retraining, log=lambda _: None)
    assert row["sparsity"] == pytest.approx(0.6, abs=1e-3) and row["finetune_epochs"] == 1


@pytest.mark.parametrize("epochs", [1, 3, 4])
def test_every_method_that_retrains_gets_the_same_fine_tuning_epochs(model_file, ctx, monkeypatch, epochs):
    from microsearch.evaluation import sweep as sweep_module

    trained = []
    monkeypatch.setattr(sweep_module, "train", lambda model, data, config: trained.append(config.epochs))
    retraining = SweepContext(ctx.data, TrainConfig(epochs=epochs, batch_size=100), CPU, tta=False)
    for method in ("layer", "han", "li", "thinet"):  # one retrain; three steps; three stages (twice)
        trained.clear()
        run_sweep(model_file, method, [0.5], retraining, log=lambda _: None)
        assert sum(trained) == epochs and all(e > 0 for e in trained), (method, trained)


def test_rows_merge_per_method_into_csv_and_json(tmp_path):
    save_rows(tmp_path, [{"method": "global", "ratio": 0.1, "val_acc": 0.5, "score": 1.0}])
    save_rows(tmp_path, [{"method": "random", "ratio": 0.1, "val_acc": 0.4, "score": 1.0}])
    merged = save_rows(tmp_path, [{"method": "global", "ratio": 0.2, "val_acc": 0.3, "score": 0.9}])
    assert [(r["method"], r["ratio"]) for r in merged] == [("random", 0.1), ("global", 0.2)]
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert json.loads((tmp_path / "sweep.json").read_text()) == merged


def test_finetune_recipe_comes_from_the_model_file():
    meta = {"train": asdict(TrainConfig(epochs=30, cutout=8, batch_size=128))}
    config = finetune_config(meta, 2, 0.01, "cpu")
    assert (config.epochs, config.lr, config.cutout, config.batch_size) == (2, 0.01, 8, 128)
    assert finetune_config(meta, 0, 0.01, "cpu") is None


def test_sweep_command_writes_csv_json_and_plot(model_file, tmp_path, capsys):
    argv = ["sweep", str(model_file), "--data", DATA.source, "--out", str(tmp_path), "--json"]
    assert main([*argv, "--method", "random", "--ratios", "0.2,0.6"]) == 0
    assert main([*argv, "--method", "global", "--ratios", "0.2,0.6"]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted({r["method"] for r in rows}) == ["global", "random"] and len(rows) == 4
    html = (tmp_path / "sweep.html").read_text()
    assert "plotly" in html and "accuracy vs score" in html
    capsys.readouterr()
    assert main([*argv, "--method", "global", "--ratios", "0.2,x"]) == 2
    assert "--ratios must be comma-separated numbers" in capsys.readouterr().err
    assert main([*argv, "--method", "global", "--ratios", "1.2"]) == 2
    assert "pruning ratio for the sweep must be in [0, 1), got 1.2" in capsys.readouterr().err


def test_the_sweep_scores_with_the_rule_of_the_model_file_and_never_mixes_rules(model_file, tmp_path, capsys):
    blob = torch.load(model_file, weights_only=True)
    blob["meta"]["rule"] = "micronet"
    torch.save(blob, tmp_path / "micronet.pt")
    out = tmp_path / "out"
    args = ["sweep", str(tmp_path / "micronet.pt"), "--data", DATA.source, "--method", "global"]
    assert main([*args, "--ratios", "0.5", "--out", str(out), "--finetune-epochs", "0"]) == 0
    (row,) = json.loads((out / "sweep.json").read_text())
    model, _ = load_model(model_file)
    assert row["rule"] == "micronet"
    assert row["params"] == audit(model, "micronet").params
    # zeroed weights leave the operations as they were: the ops term is micronet's, not lab4's
    assert row["ops_term"] == pytest.approx(audit(model, "micronet").ops_term)
    assert row["ops_term"] != pytest.approx(audit(model, "lab4").ops_term, rel=1e-3)
    save_rows(tmp_path / "lab4", [{"method": "random", "ratio": 0.1, "rule": "lab4", "score": 1.0}])
    assert main([*args, "--ratios", "0.5", "--out", str(tmp_path / "lab4"), "--finetune-epochs", "0"]) == 2
    assert "holds ['lab4'] scores, this sweep scores with micronet: use another --out" in capsys.readouterr().err
