"""Two budgets (trial target, [retrain]), the distillation teacher cache, retrain --top K."""

import importlib
import json
from dataclasses import replace

import pytest
import torch
from optuna.trial import FixedTrial

from microsearch.checkpoint import load_model
from microsearch.cli import main
from microsearch.evaluation.data import Split, load_data
from microsearch.evaluation.train import evaluate
from microsearch.search import describe, load_study, open_study, starting_points, suggest
from microsearch.search.objective import start_from, train_and_compress
from microsearch.search.teacher import ensure_teacher, start_model, teacher_path, teacher_record
from tests.helpers import assert_started_from

retrain_module = importlib.import_module("microsearch.search.retrain")  # the package exports the function
DISTIL = [
    "distill.teacher='resnet'",
    "distill.teacher_args={width = 8, blocks = [1, 1, 1]}",
    "distill.teacher_epochs=3",
    "distill.teacher_recipe='baseline'",
    "distill.weight=[0.5, 0.9]",
]


def test_the_trial_target_defaults_to_the_target_and_can_differ(tiny_study):
    path = tiny_study(target=0.6)
    assert load_study(path).trial_target == 0.6
    assert load_study(path, ["trial_target=0.4"]).trial_target == 0.4
    with pytest.raises(ValueError, match="trial_target"):
        load_study(path, ["trial_target=1.5"])


def test_the_teacher_is_trained_once_and_keyed_by_its_configuration(tiny_study):
    study = load_study(tiny_study(images=600), DISTIL)
    lines = []
    model, meta = ensure_teacher(study, log=lines.append)
    assert sum("[teacher] training" in line for line in lines) == 1
    assert teacher_path(study).is_file()
    data = load_data(study.data)  # the recorded accuracy is the cached teacher's, on the study's validation images
    assert meta["val_acc"] == evaluate(model, data.val, torch.device("cpu"), precision=study.precision).accuracy
    assert not (teacher_path(study).parent / "train.ckpt").exists()  # removed once trained
    again = []
    model2, meta2 = ensure_teacher(study, log=again.append)  # a second worker, a resumed study
    assert not any("training" in line for line in again) and meta2["val_acc"] == meta["val_acc"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    longer = load_study(study.path, [*DISTIL, "distill.teacher_epochs=4"])
    assert teacher_path(longer) != teacher_path(study)
    assert ensure_teacher(load_study(study.path)) is None  # no teacher configured: no distillation


def test_a_wrong_teacher_is_named_before_training(tiny_study):
    with pytest.raises(ValueError, match="unknown model argument"):
        load_study(tiny_study(), ["distill.teacher='resnet'", "distill.teacher_args={depth = 3}"])


def test_retrain_top_k_chooses_on_validation_and_reads_the_test_split_once_at_the_end(
    tiny_study, tmp_path, monkeypatch, capsys
):
    path = tiny_study(target=0.5, images=1000, epochs=3)
    # a trial target every trial meets, so that there are always two candidates to choose from
    settings = [*DISTIL, "trial_target=0.01", "retrain.epochs=4", "retrain.finetune_epochs=1", "retrain.lr=0.1"]
    flags = [f for s in settings for f in ("--set", s)]
    assert main(["search", str(path), "--n-trials", "3", *flags]) == 0
    study = load_study(path, settings)
    optuna_study = open_study(study)
    assert optuna_study.user_attrs["teacher"]["model"] == "resnet"
    assert all(0.5 <= t.params["distill"] <= 0.9 for t in optuna_study.trials if t.params)
    out = tmp_path / "final"
    # (candidate cards written, final card written) whenever test images are read (the cards
    # count the test images beforehand; that reads the length of their labels, not the images)
    reads = []

    class Watched(Split):
        def __getattribute__(self, name):
            if name == "images":
                cards = len(list(out.glob("candidates/*/model_card.json")))
                reads.append((cards, (out / "model_card.json").exists()))
            return super().__getattribute__(name)

    real_load, tested = retrain_module.load_data, []

    def load_watched(config):
        data = real_load(config)
        data.test = Watched(data.test.images, data.test.labels)
        return data

    def evaluate_counted(model, split, *args, **kwargs):
        tested.append(isinstance(split, Watched))
        return real_evaluate(model, split, *args, **kwargs)

    real_evaluate = retrain_module.evaluate
    monkeypatch.setattr(retrain_module, "load_data", load_watched)
    monkeypatch.setattr(retrain_module, "evaluate", evaluate_counted)
    capsys.readouterr()
    assert main(["retrain", str(path), "--top", "2", "--out", str(out), *flags]) == 0
    candidates = [json.loads(p.read_text()) for p in out.glob("candidates/*/model_card.json")]
    assert len(candidates) == 2 and all(c["test_acc"] is None for c in candidates)
    assert reads and all(r == (2, False) for r in reads)  # only after both candidates, before the card
    assert tested.count(True) == 1  # one evaluation of the test split
    card = json.loads((out / "model_card.json").read_text())
    assert card["test_acc"] is not None and card["trial"] in {c["trial"] for c in candidates}
    assert card["budget"] == {"epochs": 4, "finetune_epochs": 1, "recipe": "baseline", "lr": 0.1}
    assert card["plan"]["train"]["lr"] == 0.1
    assert card["teacher"]["val_acc"] == optuna_study.user_attrs["teacher"]["val_acc"]
    assert (card["target"], card["trial_target"]) == (0.5, 0.01)
    complete = [t for t in optuna_study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and all(t.user_attrs["val_acc"] >= 0.01 for t in complete)
    expected = sorted(complete, key=lambda t: t.value)[:2]  # the two lowest scores
    assert sorted(c["trial"] for c in candidates) == sorted(t.number for t in expected)
    err = capsys.readouterr().err
    assert "[retrain trial" in err and "epoch 5/5" in err  # 4 epochs + 1 fine-tuning epoch
    assert main(["retrain", str(path), "--top", "2", "--trial", "0", "--out", str(out), *flags]) == 2
    assert "leave out --trial" in capsys.readouterr().err


def test_a_saved_teacher_is_used_only_if_it_held_out_the_same_validation_images(tiny_study, tmp_path):
    def saved(name: str, val_size: int) -> str:
        out = tmp_path / name
        train = ["train", "--data", "synthetic:300", "--model", "resnet", "--model-arg", "width=4"]
        assert main([*train, "--model-arg", "blocks=1,1,1", "--epochs", "1", "--batch-size", "50",
                     "--val-size", str(val_size), "--out", str(out)]) == 0  # fmt: skip
        return str(out / "model.pt")

    path, good = tiny_study(images=300), saved("same", 100)  # the tiny study holds out 100 images
    study = load_study(path, [f"distill.teacher_file='{good}'"])
    model, meta = ensure_teacher(study, log=lambda line: None)
    assert teacher_path(study) == tmp_path / "same" / "model.pt" and meta["model"] == "resnet"
    assert meta["val_acc"] == evaluate(model, load_data(study.data).val, torch.device("cpu")).accuracy
    other = load_study(path, [f"distill.teacher_file='{saved('other', 50)}'"])
    with pytest.raises(ValueError, match="must not have seen the validation images"):
        ensure_teacher(other)
    with pytest.raises(ValueError, match="not teacher and teacher_file"):
        load_study(path, [f"distill.teacher_file='{good}'", "distill.teacher='resnet'"])
    with pytest.raises(ValueError, match="no model file"):
        load_study(path, [f"distill.teacher_file='{tmp_path / 'missing.pt'}'"])


def test_candidates_with_the_teachers_layers_start_from_its_weights(tiny_study, tmp_path):
    saved = tmp_path / "teacher"
    train = ["train", "--data", "synthetic:300", "--model", "resnet", "--model-arg", "width=4"]
    assert main([*train, "--model-arg", "blocks=1,1", "--model-arg", "multipliers=1,2", "--epochs", "2",
                 "--batch-size", "50", "--val-size", "100", "--out", str(saved)]) == 0  # fmt: skip
    path = tiny_study(images=300)
    init = [f"distill.teacher_file='{saved / 'model.pt'}'", "distill.init=true"]
    study = load_study(path, init)
    teacher, _ = ensure_teacher(study, log=lambda line: None)
    point = starting_points(study)[0]  # width 4, one block in each of two stages: the teacher's layers
    assert (point["width"], point["depth"]) == (4, 1)
    plan = suggest(FixedTrial(point), study)
    assert start_from(plan, study, teacher) is teacher
    assert start_from(suggest(FixedTrial({**point, "width": 2}), study), study, teacher) is None
    assert start_from(plan, load_study(path, init[:1]), teacher) is None  # init = false
    assert "start from its trained weights" in describe.distillation(study)  # the report's methodology
    assert "start from its trained weights" not in describe.distillation(load_study(path, init[:1]))
    with pytest.raises(ValueError, match="init = true"):
        load_study(path, ["distill.init=true"])  # no teacher to start from

    slow = replace(plan, train=replace(plan.train, lr=1e-6))  # the weights barely move in training
    data = load_data(study.data)
    started = train_and_compress(slow, study, data, teacher=teacher, init=teacher)
    scratch = train_and_compress(slow, study, data, teacher=teacher)
    assert_started_from(started, teacher)
    assert (scratch.get_parameter("stem.0.weight") - teacher.stem[0].weight).abs().max() > 1e-3  # 2 epochs apart

    assert main(["search", str(path), "--n-trials", "1", *(f"--set={s}" for s in init)]) == 0
    (trial,) = open_study(study).trials  # the built-in starting point: the teacher's layers
    assert trial.user_attrs["init"] == "teacher" and trial.params["width"] == 4


def test_candidates_start_from_an_init_file_while_another_model_teaches(tiny_study, tmp_path):
    def saved(name: str, *args: str, val_size: int = 100) -> str:
        out = tmp_path / name
        train = ["train", "--data", "synthetic:300", "--epochs", "1", "--batch-size", "50", "--val-size"]
        assert main([*train, str(val_size), *args, "--out", str(out)]) == 0
        return str(out / "model.pt")

    own = ["--model", "resnet", "--model-arg", "width=4", "--model-arg", "blocks=1,1", "--model-arg", "multipliers=1,2"]
    start, convnet = saved("start", *own), saved("teacher", "--model", "convnet", "--model-arg", "widths=8,8")
    path = tiny_study(images=300)
    init = [f"distill.teacher_file='{convnet}'", "distill.init=true", f"distill.init_file='{start}'"]
    study = load_study(path, init)
    teacher, _ = ensure_teacher(study, log=lambda line: None)
    lines = []
    model = start_model(study, teacher, lines.append)
    assert model is not teacher and lines == [
        f"[init] {start}: validation accuracy {load_model(start)[1]['val_acc']:.2%}; "
        "candidates with its layers start from it"
    ]
    plan = suggest(FixedTrial(starting_points(study)[0]), study)
    assert start_from(plan, study, model) is model  # the teacher has other layers: it only teaches
    assert start_from(plan, study, teacher) is None
    assert start_model(load_study(path, init[:2]), teacher) is teacher  # no init_file: the teacher
    assert start_model(load_study(path, init[:1]), teacher) is None  # init = false
    assert f"layers of the saved float model {start} start from its trained weights" in describe.distillation(study)
    alone = load_study(path, init[1:])  # init_file without a teacher: a start, no distillation
    assert describe.distillation(alone).startswith("No distillation. Candidates whose float network")
    with pytest.raises(ValueError, match="init_file is the model candidates start from: set init = true"):
        load_study(path, [init[2]])
    with pytest.raises(ValueError, match="init_file: no model file at"):
        load_study(path, ["distill.init=true", f"distill.init_file='{tmp_path / 'missing.pt'}'"])
    other = load_study(path, ["distill.init=true", f"distill.init_file='{saved('other', *own, val_size=50)}'"])
    with pytest.raises(ValueError, match=r"distill\.init_file .* must not have seen the validation images"):
        start_model(other, None)

    assert main(["search", str(path), "--n-trials", "1", *(f"--set={s}" for s in init)]) == 0
    (trial,) = open_study(study).trials  # the built-in starting point: the init file's layers
    assert trial.user_attrs["init"] == "init_file"
    card = {"budget": {"epochs": 2, "finetune_epochs": 0, "recipe": "fast", "lr": 0.1}, "teacher": None,
            "init": "init_file", "init_file": start}  # fmt: skip
    assert retrain_module.training_words(card).endswith(f", started from the float weights of {start}")


def test_distill_tta_gives_trials_the_teachers_mean_over_the_mirror(tiny_study):
    path = tiny_study()
    plain, mirrored = load_study(path, DISTIL), load_study(path, [*DISTIL, "distill.tta=true"])
    point = starting_points(plain)[0]
    assert suggest(FixedTrial(point), plain).train.teacher_tta is False
    assert suggest(FixedTrial(point), mirrored).train.teacher_tta is True
    assert "its mirror" in describe.distillation(mirrored) and "mirror" not in describe.distillation(plain)
    with pytest.raises(ValueError, match="tta = true"):
        load_study(path, ["distill.tta=true"])  # no teacher
    with pytest.raises(ValueError, match=r"\[distill\]\.tta = .yes. has the wrong type"):
        load_study(path, [*DISTIL, "distill.tta='yes'"])
    card = {"budget": {"epochs": 2, "finetune_epochs": 0, "recipe": "fast", "lr": 0.1},
            "teacher": {"model": "resnet", "val_acc": 0.9, "tta": True}}  # fmt: skip
    assert retrain_module.training_words(card).endswith("(90.00% validation) over each image and its mirror")
    card["teacher"]["tta"] = False
    assert retrain_module.training_words(card).endswith("(90.00% validation)")


def test_saved_models_teach_together_through_their_mean_logits(tiny_study, tmp_path, capsys):
    def saved(name: str, *args: str, val_size: int = 100) -> str:
        out = tmp_path / name
        train = ["train", "--data", "synthetic:300", "--epochs", "1", "--batch-size", "50", "--val-size"]
        assert main([*train, str(val_size), *args, "--out", str(out)]) == 0
        return str(out / "model.pt")

    resnet = saved("resnet", "--model", "resnet", "--model-arg", "width=4", "--model-arg", "blocks=1,1,1")
    convnet = saved("convnet", "--model", "convnet", "--model-arg", "widths=8,8")
    path = tiny_study(images=300)
    both = f"distill.teacher_files=['{resnet}', '{convnet}']"
    study = load_study(path, [both])
    lines = []
    teacher, meta = ensure_teacher(study, log=lines.append)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        mean = (load_model(resnet)[0](x) + load_model(convnet)[0](x)) / 2
        assert torch.allclose(teacher(x), mean, atol=1e-6)
    accuracy = evaluate(teacher, load_data(study.data).val, torch.device("cpu")).accuracy
    assert meta["val_acc"] == accuracy and lines[-1] == (
        f"[teacher] the mean of their logits: validation accuracy {accuracy:.2%}"
    )
    assert [m["file"] for m in meta["members"]] == [resnet, convnet]
    assert [m["val_acc"] for m in meta["members"]] == [load_model(f)[1]["val_acc"] for f in (resnet, convnet)]
    record = teacher_record(study, meta)
    assert record["model"] == "ensemble (resnet + convnet)" and record["file"] == f"{resnet} + {convnet}"
    assert f"the mean logits of the saved models {resnet}, {convnet}" in describe.distillation(study)
    assert main(["search", str(path), "--n-trials", "1", "--set", both, "--set", "distill.weight=[0.7, 0.7]"]) == 0
    optuna_study = open_study(load_study(path, [both, "distill.weight=[0.7, 0.7]"]))
    assert optuna_study.user_attrs["teacher"] == {**record, "val_acc": accuracy}
    assert [t.user_attrs["config"]["train"]["distill"] for t in optuna_study.trials] == [0.7]

    with pytest.raises(ValueError, match="not teacher_file and teacher_files"):
        load_study(path, [both, f"distill.teacher_file='{resnet}'"])
    with pytest.raises(ValueError, match="init = true with teacher_files: give init_file"):
        load_study(path, [both, "distill.init=true"])
    with pytest.raises(ValueError, match="teacher_files: no model file at"):
        load_study(path, [f"distill.teacher_files=['{resnet}', '{tmp_path / 'missing.pt'}']"])
    elsewhere = saved("other", "--model", "convnet", "--model-arg", "widths=8,8", val_size=50)
    other = load_study(path, [f"distill.teacher_files=['{resnet}', '{elsewhere}']"])
    with pytest.raises(ValueError, match=r"distill\.teacher_files .* must not have seen the validation images"):
        ensure_teacher(other, log=lambda line: None)

    # `microsearch train` takes them as --teacher twice; its summary names both and their accuracy
    capsys.readouterr()
    student = ["--model", "resnet", "--model-arg", "width=2", "--model-arg", "blocks=1,1,1"]
    teachers = ["--teacher", resnet, "--teacher", convnet]
    assert saved("student", *student, *teachers).endswith("model.pt")
    summary = load_model(tmp_path / "student" / "model.pt")[1]
    assert summary["teacher"] == {"file": f"{resnet} + {convnet}", "val_acc": accuracy}
    assert summary["train"]["distill"] == 0.9
    assert f"teacher {resnet} + {convnet}: validation accuracy {accuracy:.2%}" in capsys.readouterr().err
    # a teacher that held out other images could have trained on this run's validation images
    refused = ["--epochs", "1", "--out", str(tmp_path / "x"), "--teacher", elsewhere]
    assert main(["train", "--data", "synthetic:300", "--val-size", "100", *student, *refused]) == 2
    assert f"--teacher {elsewhere} was trained on" in capsys.readouterr().err
