"""The whole job in one resumable command: search -> candidates -> final model -> test -> report.

Each stage writes into the campaign folder and is skipped when its output is there, so running the
same command again after a crash, a Ctrl-C or the end of a session goes on where it stopped:
finished trials live in the study's storage inside the folder, a candidate being retrained resumes
after its last finished epoch, and the time budget counts the trials already run.

    DIR/study.db (or study.log)   the study: SQLite, or a journal file when several GPUs share it
    DIR/candidates/trial-N/       the K best trials retrained, validation images held out
    DIR/final/                    the chosen candidate, tested once: model.pt, model_card.{json,md}
    DIR/pareto.html, DIR/report/  the accuracy-vs-score figure and the report
    DIR/summary.json              trials, time, throughput, device, precision, best and final numbers
"""

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from microsearch.search.pareto import save_pareto
from microsearch.search.report import write_report
from microsearch.search.retrain import retrain_top
from microsearch.search.run import best_feasible, open_study, requeue_interrupted, run_worker
from microsearch.search.study import StudyConfig
from microsearch.search.workers import launch

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _trial_seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    # A killed run's trial ended at an unknown time: counting until it was found would charge the
    # search for the hours the campaign was not running. (Its retry inherits the mark.)
    if trial.state == TrialState.FAIL and trial.user_attrs.get("killed_run"):
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def storage_for(out: Path, gpus: int) -> str:
    """The campaign's own storage: SQLite for one worker, a journal file for several."""
    return f"journal:{out / 'study.log'}" if gpus > 1 else f"sqlite:///{(out / 'study.db').resolve()}"


def search_stage(
    study: StudyConfig, storage: str, hours: float | None, log: Callable[[str], None], *, own: bool
) -> optuna.Study:
    """Run trials until the study has ``[budget] trials`` finished ones or the trials have used
    ``hours`` (counted from the storage, so a resumed campaign spends only what is left).
    ``own``: the storage is the campaign folder's, written by no process but this command's
    workers, so a trial found RUNNING was left by a killed run: it is requeued at once."""
    optuna_study = open_study(study, storage)
    if own:
        for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            optuna.Trial(optuna_study, trial._trial_id).set_user_attr("killed_run", True)
            requeue_interrupted(optuna_study, trial.number)
            log(f"[campaign] trial {trial.number} was left running by a killed run: queued again")
    trials = optuna_study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in _FINISHED]
    left_trials = study.budget.trials - len(finished)
    spent = sum(_trial_seconds(t) for t in trials)
    left_seconds = None if hours is None else hours * 3600 - spent
    log(
        f"[campaign] search: {len(finished)}/{study.budget.trials} trials finished, {spent:.0f}s spent"
        + ("" if left_seconds is None else f", {max(0.0, left_seconds):.0f}s left")
    )
    if left_trials <= 0 or (left_seconds is not None and left_seconds <= 0):
        return optuna_study
    gpus = torch.cuda.device_count()
    if gpus > 1:
        args = ["--n-trials", str(math.ceil(left_trials / gpus))]
        if left_seconds is not None:
            args += ["--timeout", str(left_seconds)]
        launch(study, gpus, [str(g) for g in range(gpus)], storage, ["--storage", storage, *args])
        return open_study(study, storage)
    return run_worker(study, storage, n_trials=left_trials, timeout=left_seconds, log=log)


def summarize(optuna_study: optuna.Study, study: StudyConfig, final: dict, hours: float | None) -> dict:
    trials = optuna_study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    seconds = sum(_trial_seconds(t) for t in trials)
    finished = [t for t in trials if t.state in _FINISHED]
    # The median epoch: the steady state (first epochs and fine-tuning epochs include compilation).
    speeds = sorted(h["images_per_second"] for t in finished for h in t.user_attrs.get("history", []))
    best = best_feasible(optuna_study)
    return {
        "study": study.name,
        "data": study.data.source,
        "target": study.target,
        "rule": study.rule,
        "hours_budget": hours,
        "trials": states,
        "trials_finished": len(finished),
        "search_seconds": seconds,
        "trials_per_hour": len(finished) / seconds * 3600 if seconds else None,
        "seconds_per_trial": seconds / len(finished) if finished else None,
        "images_per_second": speeds[len(speeds) // 2] if speeds else None,
        "device": final["device"],
        "precision": final["precision"],
        "best_feasible_trial": None if best is None else best.number,
        "best_feasible_score": None if best is None else best.value,
        "final": {
            "trial": final["trial"],
            "val_acc": final["val_acc"],
            "test_acc": final["test_acc"],
            "score": final["audit"]["score"],
            "param_term": final["audit"]["param_term"],
            "ops_term": final["audit"]["ops_term"],
            "reaches_target": final["val_acc"] is not None and final["val_acc"] >= study.target,
        },
    }


def campaign(
    study: StudyConfig,
    out: str | Path,
    hours: float | None = None,
    storage: str | None = None,
    top: int | None = None,
    retrain_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Search, retrain the ``top`` best trials (default ``[retrain] top``) with the retrain budget,
    choose on validation, test once, report.

    Example: ``campaign(load_study("studies/smoke.toml"), "runs/smoke", hours=0.1)``.
    """
    if top is not None and top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    if hours is not None and hours <= 0:
        raise ValueError(f"--hours must be > 0, got {hours}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    own = storage is None
    storage = storage or storage_for(out, torch.cuda.device_count())
    optuna_study = search_stage(study, storage, hours, log, own=own)
    final = retrain_top(study, optuna_study, out, top, retrain_epochs, out / "final", log)
    try:
        save_pareto(optuna_study, study, out / "pareto.html", final, log)
        write_report(study, optuna_study, out / "report", None, out / "final")
    except ModuleNotFoundError as e:  # a bare GPU machine carries no plotly / optuna-dashboard
        log(
            f"[campaign] figure and report skipped: {e.name} is not installed here; "
            f"`microsearch report {study.path} --storage {storage} --model {out / 'final'}` makes them elsewhere"
        )
    summary = summarize(optuna_study, study, final, hours)
    summary["campaign_seconds_this_run"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
