import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from microsearch.cli import main
from microsearch.search import load_study, open_storage, open_study

POSTGRES = os.environ.get("MICROSEARCH_TEST_POSTGRES")


def _storages(tmp_path: Path) -> dict[str, str]:
    return {"sqlite": f"sqlite:///{tmp_path / 'study.db'}", "journal": f"journal:{tmp_path / 'study.log'}"}


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_three_parallel_workers_share_one_study(kind, tiny_study, tmp_path, capsys):
    if kind == "postgresql":
        if not POSTGRES:
            pytest.skip("MICROSEARCH_TEST_POSTGRES is not set (.ci/run sets it)")
        url = POSTGRES
    else:
        url = _storages(tmp_path)[kind]
    path = tiny_study()
    study = load_study(path)
    code = main(["launch", str(path), "--workers", "3", "--n-trials", "2", "--storage", url])
    assert code == 0, capsys.readouterr().err
    result = optuna.load_study(study_name=study.name, storage=open_storage(url))
    trials = result.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(6))  # no duplicate numbers, nothing lost
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 1
    # learning curves live in "history": no intermediate value becomes a stopped trial's value
    assert all("config" in t.user_attrs and t.user_attrs["history"] and not t.intermediate_values for t in trials)
    if kind == "postgresql":
        optuna.delete_study(study_name=study.name, storage=url)


def _worker(path: Path, url: str, n_trials: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "microsearch",
        "search",
        str(path),
        "--storage",
        url,
        "--n-trials",
        str(n_trials),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_killed_workers_trial_is_marked_failed_and_retried(tiny_study, tmp_path):
    path = tiny_study(images=3000, epochs=3)  # a few seconds per trial: time to kill it mid-way
    study = load_study(path)
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    storage = open_storage(url, study.heartbeat, study.grace)
    victim = _worker(path, url, 1)
    deadline = time.time() + 120
    running = []
    while not running and time.time() < deadline and victim.poll() is None:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name=study.name, storage=storage).get_trials(states=(TrialState.RUNNING,))
            running = [t for t in trials if "config" in t.user_attrs]  # sampled whole: training
        except KeyError:  # the study is not created yet
            continue
    assert running, f"the worker never started a trial: {victim.stderr.read() if victim.poll() is not None else ''}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(study.grace + 1)  # no heartbeat for longer than the grace period

    rescuer = _worker(path, url, 1)
    _, err = rescuer.communicate(timeout=300)
    assert rescuer.returncode == 0, err
    trials = optuna.load_study(study_name=study.name, storage=storage).get_trials()
    killed = next(t for t in trials if t.number == running[0].number)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
    assert killed.state == TrialState.FAIL
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.params == killed.params


def test_restarting_a_study_resumes_it(tiny_study, tmp_path, capsys):
    path = tiny_study()
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    assert main(["search", str(path), "--storage", url, "--n-trials", "2"]) == 0
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 0
    study = load_study(path)
    trials = optuna.load_study(study_name=study.name, storage=url).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].params["width"] == 4  # the enqueued starting point ran first, once
    out = capsys.readouterr().out
    assert f"study {study.name}:" in out and ("best feasible: trial" in out or "no trial reached" in out)


def test_a_changed_definition_is_refused_on_the_same_storage(tiny_study, tmp_path, capsys):
    path = tiny_study()
    url = f"sqlite:///{tmp_path / 'def.db'}"
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 0
    assert main(["search", str(path), "--storage", url, "--n-trials", "1", "--set", "target=0.5"]) == 2
    assert "created from a different definition (differs in: target, trial_target)" in capsys.readouterr().err
    other_host = ["--set", f"data.cache_dir='{tmp_path / 'elsewhere'}'", "--set", "budget.trials=9"]
    assert main(["search", str(path), "--storage", url, "--n-trials", "1", *other_host]) == 0
    # A study stored before a setting existed resumes while the setting holds its default.
    stored = optuna.load_study(study_name=load_study(path).name, storage=url)
    definition = stored.user_attrs["definition"]
    del definition["distill"]["init_file"], definition["space"]["granularity"]
    stored.set_user_attr("definition", definition)
    capsys.readouterr()
    assert main(["search", str(path), "--storage", url, "--n-trials", "1"]) == 0
    assert main(["search", str(path), "--storage", url, "--n-trials", "1", "--set", "space.granularity='block'"]) == 2
    assert "(differs in: space)" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_launch_stops_every_worker(tiny_study, tmp_path, signum):
    path = tiny_study(images=3000, epochs=20)  # trials long enough to be interrupted
    study = load_study(path)
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    # Trials enough that a worker done with its first starts another: both are training at once.
    more = ["--set", "budget.trials=50"]
    cmd = [sys.executable, "-m", "microsearch", "launch", str(path), "--workers", "2", "--storage", url, *more]
    launcher = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    storage = open_storage(url, study.heartbeat, study.grace)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.3)
        assert launcher.poll() is None, f"the launcher exited ({launcher.returncode}): {launcher.stderr.read()}"
        try:
            trials = optuna.load_study(study_name=study.name, storage=storage).get_trials(states=(TrialState.RUNNING,))
            running = [t for t in trials if "config" in t.user_attrs]  # sampled whole: training
        except KeyError:
            continue
        if len([t for t in running if t.user_attrs.get("history")]) == 2:  # both inside their first epochs
            break
    assert len(running) == 2, "both workers should be training"
    launcher.send_signal(signum)  # the launcher alone (what a scheduler signals): it must pass it on
    assert launcher.wait(timeout=60) == 130, launcher.stderr.read()
    stderr = launcher.stderr.read()
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr  # one line per worker
    with pytest.raises(ProcessLookupError):  # no worker left in the launcher's process group
        os.killpg(launcher.pid, 0)
    trials = optuna.load_study(study_name=study.name, storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], stderr
    failed = [t for t in trials if t.state == TrialState.FAIL]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(failed) == 2, [(t.number, t.state.name) for t in trials]  # the interrupted trials are marked...
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted(t.number for t in failed)
    assert {str(t.params) for t in queued} == {str(t.params) for t in failed}  # ...and queued again


def test_a_gpu_torch_does_not_see_is_refused_naming_those_that_exist(tiny_study, monkeypatch, capsys):
    path = tiny_study()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["launch", str(path), "--gpus", "1,7"]) == 2
    assert "--gpus 7: no such GPU (the GPUs here are 0, 1)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["launch", str(path), "--gpus", "0"]) == 2
    assert "--gpus 0: no such GPU (torch sees no GPU here)" in capsys.readouterr().err


def test_workers_share_a_gpu_on_a_journal_file_and_sqlite_is_refused(tiny_study, tmp_path, capsys, monkeypatch):
    path = tiny_study()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU seen; the tiny study trains on the CPU
    sqlite = ["--storage", f"sqlite:///{tmp_path / 'k.db'}"]
    assert main(["launch", str(path), "--gpus", "0", "--workers-per-gpu", "2", *sqlite]) == 2
    assert "2 workers cannot share the SQLite file" in capsys.readouterr().err
    assert main(["launch", str(path), "--workers-per-gpu", "2"]) == 2
    assert "--workers-per-gpu needs --gpus" in capsys.readouterr().err
    url = f"journal:{tmp_path / 'k.log'}"
    code = main(["launch", str(path), "--gpus", "0", "--workers-per-gpu", "2", "--n-trials", "2", "--storage", url])
    assert code == 0
    trials = open_study(load_study(path), url).get_trials()
    assert len(trials) == 4  # 2 workers x 2 trials, none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no parameter set run twice


def test_running_the_same_search_twice_never_repeats_a_parameter_set(tiny_study, tmp_path):
    path = tiny_study()
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    for _ in range(2):  # a resume, or a second identical worker started later
        assert main(["search", str(path), "--storage", url, "--n-trials", "2"]) == 0
    trials = open_study(load_study(path), url).get_trials()
    assert len(trials) == 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    seeds = {t.user_attrs["sampler_seed"] for t in trials}
    assert len(seeds) == 2  # one fresh seed per process, recorded with each trial


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_an_interrupted_trial_is_failed_and_queued_again_with_its_parameters():
    from microsearch.search.run import requeue_interrupted

    study = optuna.create_study()
    running = study.ask()
    x = running.suggest_float("x", 0, 1)
    requeue_interrupted(study, running.number)
    trials = study.get_trials()
    assert [(t.state, t.params) for t in trials] == [(TrialState.FAIL, {"x": x}), (TrialState.WAITING, {"x": x})]
    retry = study.ask()
    assert retry.number == 1 and retry.suggest_float("x", 0, 1) == x
    study.tell(retry, 0.5)
    requeue_interrupted(study, retry.number)  # a finished trial is left as it is
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_requeue_frees_a_trial_a_killed_worker_left_running_on_a_journal_file(tiny_study, tmp_path, capsys):
    from microsearch.search.run import stale_note

    path = tiny_study()
    url = f"journal:{tmp_path / 'j.log'}"
    study = load_study(path)
    orphan = open_study(study, url).ask()  # as a SIGKILLed worker leaves it: RUNNING, no heartbeat
    orphan.suggest_int("width", 2, 4, log=True)
    args = ["requeue", str(path), "--storage", url, "--running-older-than"]
    assert main([*args, "60"]) == 0 and "RUNNING for more than 60 min: none" in capsys.readouterr().out
    assert "requeue" in stale_note(study, open_study(study, url), minutes=0)  # what search and report say
    assert main([*args, "0"]) == 0 and f"RUNNING for more than 0 min: {orphan.number}" in capsys.readouterr().out
    trials = open_study(study, url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].params["width"] == 4 and trials[1].params == trials[0].params  # queued with its values
    assert main([*args, "-1"]) == 2 and "must be >= 0" in capsys.readouterr().err


def test_workers_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    code = (
        "import sys, time\n"
        "from microsearch.search.storage import open_storage\n"
        "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"  # start together
        "open_storage(sys.argv[1])\n"
    )
    for round_ in range(2):  # (without retries, each round met "UNIQUE constraint failed: alembic_version")
        url, start = f"sqlite:///{tmp_path / f'new{round_}.db'}", str(time.time() + 15)  # after the imports
        procs = [
            subprocess.Popen([sys.executable, "-c", code, url, start], stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        errors = [p.stderr.read() for p in procs if p.wait(timeout=120) != 0]
        assert not errors, errors[0]


def test_two_workers_on_sqlite_never_both_take_one_queued_trial(tmp_path):
    # Worker A takes the queued trial: it reads it WAITING and writes it RUNNING in one
    # transaction, still open while worker B asks for the same trial. B must wait for A's commit
    # and be told no; without the write lock at BEGIN it read WAITING and took the trial too.
    url = f"sqlite:///{tmp_path / 'pop.db'}"
    a, b = open_storage(url), open_storage(url)
    study = optuna.create_study(study_name="pop", storage=a)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials()[0]._trial_id
    answer = []
    with a.engine.begin() as connection:
        state = connection.exec_driver_sql("SELECT state FROM trials WHERE trial_id = ?", (trial_id,)).scalar()
        assert state == "WAITING"
        worker_b = threading.Thread(
            target=lambda: answer.append(b.set_trial_state_values(trial_id, TrialState.RUNNING))
        )
        worker_b.start()
        time.sleep(1.0)  # B has read by now, unless it waits for A's lock
        connection.exec_driver_sql("UPDATE trials SET state = 'RUNNING' WHERE trial_id = ?", (trial_id,))
    worker_b.join(timeout=60)
    assert answer == [False]
    assert [t.state for t in optuna.load_study(study_name="pop", storage=b).get_trials()] == [TrialState.RUNNING]
    reader = open_storage(url, create=False)  # report and dashboard: no write lock, so a read-only file opens
    assert len(optuna.load_study(study_name="pop", storage=reader).get_trials()) == 1
