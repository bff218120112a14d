import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from microsearch.checkpoint import load_model
from microsearch.cli import main
from microsearch.search import open_study


def _trials(study):
    return optuna.load_study(study_name=study.name, storage=study.storage_url).get_trials()


def test_completed_trials_carry_feasibility_notes_and_model_files(searched):
    from optuna_dashboard import get_note
    from optuna_dashboard._note import get_note_from_system_attrs

    _, study = searched
    optuna_study = optuna.load_study(study_name=study.name, storage=study.storage_url)
    done = [t for t in optuna_study.get_trials() if t.state == TrialState.COMPLETE]
    assert done
    for t in done:
        gap = study.target - t.user_attrs["val_acc"]
        assert t.constraints == {"0": gap, "accuracy": gap}  # Optuna 5 key and the dashboard's list
        assert (study.artifacts_dir / t.user_attrs["artifact_id"]).is_file()
        note = get_note_from_system_attrs(
            optuna_study._storage.get_study_system_attrs(optuna_study._study_id), t._trial_id
        )["body"]
        assert f"Trial {t.number}: score {t.value:.5f}" in note and "| stem.0 | QuantConv2d |" in note
        _, meta = load_model(study.artifacts_dir / t.user_attrs["artifact_id"])
        assert meta["trial"] == t.number and meta["score"] == pytest.approx(t.value)
    note = get_note(optuna_study)
    assert "Minimise the audited compression score" in note
    assert "recipe baseline (nothing more). Training runs at the auto precision" in note
    assert f"Best feasible trial so far: {optuna_study.best_trial.number}**" in note
    assert optuna_study.metric_names == ["score"]


def test_retrain_writes_model_and_card_that_rescore_identically(searched, tmp_path, capsys):
    path, study = searched
    out = tmp_path / "final"
    assert main(["retrain", str(path), "--trial", "best", "--epochs", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model_card.json", "model_card.md"]
    card = json.loads((out / "model_card.json").read_text())
    best = open_study(study).best_trial
    assert card["trial"] == best.number and card["hyperparameters"] == best.params
    assert card["data"]["train_images"] == 1000 and card["data"]["test_images"] == 200  # train + val, then test
    assert card["plan"]["train"]["epochs"] == 1
    assert {"seconds", "device", "version", "command"} <= set(card)
    torch.load(out / "model.pt", weights_only=True)
    capsys.readouterr()
    assert main(["score", str(out / "model.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card["audit"]
    assert main(["evaluate", str(out / "model.pt"), "--data", study.data.source, "--split", "test", "--json"]) == 0
    tested = json.loads(capsys.readouterr().out)  # the card's test accuracy is the saved model's
    assert (tested["accuracy"], tested["images"]) == (card["test_acc"], 200)
    md = (out / "model_card.md").read_text()
    assert f"{card['test_acc']:.2%}" in md and "stages.0.0.conv1.0" in md


def test_retrain_rejects_unknown_trials_and_missing_test_splits(searched, tmp_path, capsys):
    path, _ = searched
    assert main(["retrain", str(path), "--trial", "99", "--out", str(tmp_path)]) == 2
    assert "has no trial 99" in capsys.readouterr().err
    assert main(["retrain", str(path), "--trial", "first", "--out", str(tmp_path)]) == 2
    assert "--trial must be 'best' or a trial number" in capsys.readouterr().err


def test_report_has_methodology_trials_plot_card_and_sweeps(searched, tmp_path, capsys):
    path, study = searched
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    rows = [
        {
            "method": "global",
            "ratio": 0.5,
            "val_acc": 0.4,
            "score": 0.01,
            "params": 10,
            "nonzero_params": 5,
            "sparsity": 0.5,
            "finetune_epochs": 0,
        }
    ]
    (sweeps / "sweep.json").write_text(json.dumps(rows))
    assert main(["retrain", str(path), "--epochs", "1", "--out", str(tmp_path / "final")]) == 0
    out = tmp_path / "report"
    assert (
        main(["report", str(path), "--out", str(out), "--sweeps", str(sweeps), "--model", str(tmp_path / "final")]) == 0
    )
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    trials = _trials(study)
    for text in ("Methodology", "Accuracy vs score", "Pruning sweeps", "Final model (trial", "plotly"):
        assert text in page
    card = json.loads((tmp_path / "final" / "model_card.json").read_text())
    assert "| parameter | value |" in md and all(f"| {k} |" in md for k in card["hyperparameters"])
    assert "| layer | kind | params | nonzero | sparsity | bits w/a | ops |" in md
    assert f"Retrained {card['budget']['epochs']} epochs + {card['budget']['finetune_epochs']} fine-tuning" in md
    assert page.count("<tr>") >= len(trials) + 1
    for t in trials:
        assert f"| {t.number} | {t.state.name.lower()} |" in md
    assert "| width: first-stage channels (log scale) | [2, 4] |" in md
    capsys.readouterr()
    assert main(["report", str(path), "--out", str(out), "--model", str(tmp_path / "nothing")]) == 2
    assert "no model_card.json in" in capsys.readouterr().err


def _dashboard_api(storage_url: str, path: str) -> dict:
    """A GET on optuna-dashboard's own HTTP API (its public WSGI app), as its web page reads it."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    environ: dict = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(optuna_dashboard.wsgi(storage_url)(environ, lambda s, headers, *exc: status.append(s)))
    assert status == ["200 OK"], (path, status)
    return json.loads(body)


def test_pareto_command_writes_the_figure_and_stores_it_for_the_dashboard(searched, tmp_path):
    path, study = searched
    assert main(["pareto", str(path), "--out", str(tmp_path / "p.html")]) == 0
    assert "target 15%" in (tmp_path / "p.html").read_text()
    (summary,) = _dashboard_api(study.storage_url, "/api/studies")["study_summaries"]
    figures = _dashboard_api(study.storage_url, f"/api/studies/{summary['study_id']}")["plotly_graph_objects"]
    assert len(figures) == 1 and "target 15%" in json.dumps(figures)


def test_retrain_without_a_test_split_says_how_to_measure_it(tmp_path, capsys):
    from tests.test_cli import _image_tree

    _image_tree(tmp_path / "imgs", classes=10, per_class=12)
    _image_tree(tmp_path / "with_test", classes=10, per_class=3, test=True)
    path = tmp_path / "notest.toml"
    path.write_text(
        f"""
[study]
name = "notest"
target = 0.1
device = "cpu"
[data]
source = "imagefolder:{tmp_path / "imgs"}"
val_size = 20
cache_dir = "{tmp_path / "cache"}"
[budget]
epochs = 1
finetune_epochs = 0
batch_size = 20
[space]
width = [2, 2]
depth = [1, 1]
blocks = ["basic"]
"""
    )
    assert main(["search", str(path), "--n-trials", "1"]) == 0
    out = tmp_path / "final"
    assert main(["retrain", str(path), "--trial", "0", "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["test_acc"] is None and card["data"]["train_images"] == 120 and card["data"]["test_images"] == 0
    command = f"microsearch evaluate {out / 'model.pt'} --data SOURCE --split test"
    assert card["test_command"] == command
    assert f"not measured: imagefolder:{tmp_path / 'imgs'} has no test split" in (out / "model_card.md").read_text()
    assert "not measured" in capsys.readouterr().out
    source = f"imagefolder:{tmp_path / 'with_test'}"
    assert main(["evaluate", str(out / "model.pt"), "--data", source, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 30 and result["score"] == pytest.approx(card["audit"]["score"])
    assert main(["evaluate", str(out / "model.pt"), "--data", source, "--split", "val"]) == 2
    assert "trained on every training image" in capsys.readouterr().err


def test_read_only_commands_create_nothing_on_a_mistyped_storage(searched, tmp_path, capsys):
    path, _ = searched
    for storage in (f"sqlite:///{tmp_path / 'typo.db'}", f"journal:{tmp_path / 'typo.log'}"):
        for command in (["report", "--out", str(tmp_path / "r")], ["pareto", "--out", str(tmp_path / "p.html")]):
            assert main([command[0], str(path), "--storage", storage, *command[1:]]) == 2
            assert "(a mistyped path? `microsearch search` creates it)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no database, no journal, no report
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="someone-else", storage=other)
    assert main(["retrain", str(path), "--storage", other, "--out", str(tmp_path / "f")]) == 2
    assert "no study named 'done' in that storage yet (it has: ['someone-else'])" in capsys.readouterr().err


def test_the_dashboard_warns_when_it_listens_beyond_this_machine(searched, monkeypatch, capsys):
    import optuna_dashboard

    path, _ = searched
    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.append(kw))
    assert main(["dashboard", str(path), "--host", "0.0.0.0", "--port", "8099"]) == 0
    assert "warning: --host 0.0.0.0 makes the dashboard" in capsys.readouterr().err
    assert main(["dashboard", str(path), "--port", "8099"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert [s["host"] for s in served] == ["0.0.0.0", "127.0.0.1"]
