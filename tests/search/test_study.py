import os
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
from optuna.trial import FixedTrial

from microsearch.cli import main
from microsearch.compression import quantize_
from microsearch.evaluation import audit
from microsearch.models import create_model
from microsearch.search import StudyError, load_study, starting_points, suggest
from microsearch.search.space import MODEL

STUDIES = Path(__file__).parents[2] / "studies"
COMMITTED_TEACHER = "benchmarks/results/2026-11-25-part1-jpeg/resnet20/model.pt"


@pytest.mark.parametrize("name", ["smoke", "cifar10"])
def test_shipped_studies_are_valid(name):
    study = load_study(STUDIES / f"{name}.toml")
    assert study.name == name
    assert study.storage_url == f"sqlite:///{(STUDIES / f'{name}.db').resolve()}"


def test_the_real_study_targets_90_percent_on_cifar10():
    study = load_study(STUDIES / "cifar10.toml")
    assert study.target == 0.90 and study.data.source.startswith(("cifar10", "imagefolder"))


def test_overrides_are_validated_like_the_file(tiny_study):
    study = load_study(tiny_study(), ["budget.epochs=3", "space.width=[2, 8]", "target=0.5"])
    assert (study.budget.epochs, study.space.width, study.target) == (3, (2, 8), 0.5)
    with pytest.raises(StudyError, match=r"\[budget\]: epochs must be >= 1, got 0"):
        load_study(tiny_study(), ["budget.epochs=0"])


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("[budget]", "[budget]\nepochz = 3"), "unknown key [budget].epochz"),
        (("target = 0.2", ""), "[study] target is missing"),
        (('source = "synthetic:300"', ""), "[data] source is missing"),
        (("[pruner]", "[prunerz]"), "unknown table [prunerz]"),
        (("epochs = 1", 'epochs = "one"'), "[budget].epochs = 'one' has the wrong type"),
        (("width = [2, 4]", "width = [4, 2]"), "[space]: width must be [low, high]"),
        (('blocks = ["basic"]', 'blocks = ["vgg"]'), "blocks must be a non-empty list"),
        (("target = 0.2", "target = 1.5"), "[study]: target must be in (0, 1]"),
        (("synthetic:300", "mnist"), "unknown data source 'mnist'"),
        (("[budget]", "[budget"), "not valid TOML"),
    ],
)
def test_bad_study_files_name_the_key(tiny_study, edit, needle):
    path = tiny_study()
    path.write_text(path.read_text().replace(*edit, 1))
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert needle in str(error.value) and str(path) in str(error.value)


def test_a_bad_study_file_fails_in_the_cli_before_any_training(tiny_study, capsys):
    path = tiny_study()
    path.write_text(path.read_text().replace("[space]", "[space]\nwidht = [2, 4]"))
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key [space].widht" in err and len(err.strip().splitlines()) == 1
    assert "epoch" not in err


def test_an_unreachable_storage_fails_with_one_line_that_hides_the_password(tiny_study, capsys):
    url = "postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none"
    assert main(["search", str(tiny_study()), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage postgresql+psycopg://nobody:***@127.0.0.1:1/none" in err
    assert "s3cret" not in err and len(err.strip().splitlines()) == 1


def test_an_empty_study_file_is_refused_before_anything_runs(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["search", str(empty), "--n-trials", "1"]) == 2
    assert "[study] target is missing" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.db"))  # nothing was created


def test_missing_study_file(capsys):
    assert main(["search", "no/such.toml"]) == 2
    assert "no study file at no/such.toml" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda p: p.name)
def test_every_committed_study_loads_and_its_starting_points_build(path):
    # A teacher that its study file says to train first (not committed: runs/ holds run outputs) is
    # stood in for by the committed float ResNet-20, so everything else in the file is checked.
    teacher = tomllib.loads(path.read_text()).get("distill", {}).get("teacher_file", "")
    stand_in = [f"distill.teacher_file={COMMITTED_TEACHER}"] if teacher.startswith("runs/") else []
    study = load_study(path, stand_in)
    base = starting_points(study)[0]
    for point in [base, *study.enqueue]:
        unknown = set(point) - set(base) - {"expansion"}
        assert not unknown, f"{path.name}: enqueued parameters outside the space: {unknown}"
        plan = suggest(FixedTrial({**base, **point}), study)
        model = create_model(MODEL, **plan.model)
        quantize_(model, plan.quant)
        assert audit(model).score > 0


def test_opening_a_study_quiets_optuna_only_while_it_runs(tiny_study, caplog, monkeypatch):
    import optuna

    from microsearch.search import open_study

    monkeypatch.setattr(optuna.logging.get_logger("optuna"), "propagate", True)  # to caplog
    optuna.logging.set_verbosity(optuna.logging.INFO)
    open_study(load_study(tiny_study()))  # creates it: Optuna's "A new study created" line is not shown
    assert optuna.logging.get_verbosity() == optuna.logging.INFO  # the caller's level, unchanged
    assert "A new study created" not in caplog.text
    optuna.create_study()  # outside microsearch the caller's level applies
    assert "A new study created" in caplog.text


@pytest.mark.parametrize(
    ("point", "needle"),
    [
        ("widht = 4", "[[enqueue]] point 1: 'widht' is not a parameter of this space"),
        ("width = 64", "[[enqueue]] point 1: width = 64 is outside the space ([2, 4])"),
        ('block = "vgg"', "[[enqueue]] point 1: 'vgg' not in ('basic',)"),
    ],
)
def test_enqueued_points_are_checked_before_the_study_is_stored(tiny_study, tmp_path, capsys, point, needle):
    path = tiny_study()
    path.write_text(path.read_text() + f"\n[[enqueue]]\n{point}\n")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.db").exists()  # nothing written


def test_a_wrong_data_source_does_not_lock_the_study(tiny_study, tmp_path, capsys):
    path = tiny_study()
    url = f"sqlite:///{tmp_path / 'd.db'}"
    missing = ["--set", f"data.source='imagefolder:{tmp_path / 'nowhere'}'"]
    assert main(["search", str(path), "--storage", url, "--n-trials", "1", *missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 0  # the corrected run is accepted


def test_a_server_that_never_answers_fails_with_one_line_instead_of_hanging(tiny_study, monkeypatch, capsys):
    import socket
    import time

    from microsearch.search import storage

    monkeypatch.setattr(storage, "CONNECT_TIMEOUT", 2)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql+psycopg://nobody@127.0.0.1:{silent.getsockname()[1]}/none"
        started = time.monotonic()
        assert main(["search", str(tiny_study()), "--storage", url]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"cannot open storage {url}" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def read_only():
    """Makes files unwritable, for root too (who ignores mode bits): immutable where it can."""
    locked = []

    def lock(path: Path) -> None:
        path.chmod(0o444)
        if os.access(path, os.W_OK):
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("this user can write any file and cannot make one immutable (chattr)")
            locked.append(path)

    yield lock
    for path in locked:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_database_is_read_by_report_and_refused_by_search_in_one_line(
    searched, tmp_path, read_only, capsys
):
    path, study = searched
    db = tmp_path / "ro.db"
    shutil.copy(study.storage_url.removeprefix("sqlite:///"), db)
    read_only(db)
    url = f"sqlite:///{db}"
    assert main(["report", str(path), "--storage", url, "--out", str(tmp_path / "r")]) == 0
    assert main(["pareto", str(path), "--storage", url, "--out", str(tmp_path / "p.html")]) == 0
    err = capsys.readouterr().err
    assert "the figure is not stored in the study: its storage refused the write" in err and "Traceback" not in err
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "p.html").is_file()
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert f"storage {url} cannot be written (attempt to write a readonly database)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_damaged_journal_file_fails_in_one_line_naming_it(searched, tmp_path, capsys):
    path, _ = searched
    journal = tmp_path / "j.log"
    journal.write_text('garbage\n{"op_code": 1}\n')
    for command in (["report", "--out", str(tmp_path / "r")], ["search", "--n-trials", "1"]):
        assert main([command[0], str(path), "--storage", f"journal:{journal}", *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"the journal file {journal} cannot be read as an Optuna journal" in err
        assert len(err.strip().splitlines()) == 1


def test_the_dashboard_refuses_an_impossible_or_busy_port_in_one_line(searched, capsys):
    path, _ = searched
    assert main(["dashboard", str(path), "--port", "99999"]) == 2
    assert "--port must be 1-65535, got 99999" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["dashboard", str(path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in err and len(err.splitlines()) == 1


def test_a_binary_study_file_is_named(tmp_path, capsys):
    binary = tmp_path / "model.toml"
    binary.write_bytes(b"PK\x03\x04\xf0\xff\x00garbage")
    assert main(["search", str(binary)]) == 2
    assert f"{binary}: not a study file (binary, not TOML text)" in capsys.readouterr().err


def test_image_classes_are_checked_against_the_networks_and_cifar10(tiny_study, tmp_path):
    from PIL import Image

    from microsearch.search.run import study_data

    def tree(classes: int) -> str:
        root = tmp_path / f"c{classes}"
        for c in range(classes):
            (root / f"k{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (20 * c + i,) * 3).save(root / f"k{c}" / f"{i}.png")
        return f"data.source='imagefolder:{root}'"

    path, logged = tiny_study(), []
    with pytest.raises(StudyError, match="has 11 classes; the searched networks classify 10"):
        study_data(load_study(path, [tree(11), "data.val_size=2"]), logged.append)
    data = study_data(load_study(path, [tree(2), "data.val_size=2"]), logged.append)
    assert data.classes == ["k0", "k1"] and len(logged) == 1
    assert "has the classes ['k0', 'k1'], not CIFAR-10's ['airplane'" in logged[0]
    study_data(load_study(path), logged.append)  # synthetic data: no warning
    assert len(logged) == 1
