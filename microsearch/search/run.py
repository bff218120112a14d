"""Workers: each runs trials of one named study on a shared storage until its budget is spent."""

import datetime
import importlib.util
import logging
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, Field, asdict, fields

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from microsearch.evaluation.data import CIFAR10_CLASSES, Dataset, load_data
from microsearch.evaluation.train import TrainingDiverged
from microsearch.evaluation.views import counts, params_inline, score_terms
from microsearch.models import create_model
from microsearch.search import describe
from microsearch.search.objective import Objective
from microsearch.search.pruner import TargetPruner, is_feasible
from microsearch.search.space import MODEL, check_enqueue, starting_points
from microsearch.search.storage import open_storage
from microsearch.search.study import StudyConfig, StudyError
from microsearch.search.teacher import ensure_teacher, start_model, teacher_record

# What defines the search: a worker whose file differs here from the stored study is refused.
_DEFINING = ("target", "trial_target", "rule", "data", "space", "compression", "distill")


def _definition(study: StudyConfig) -> dict:
    d = asdict(study)
    defining = {k: d[k] for k in _DEFINING}
    defining["budget"] = {
        k: d["budget"][k] for k in ("epochs", "finetune_epochs", "finetune_lr", "batch_size", "tta", "recipe")
    }
    del defining["data"]["cache_dir"]  # machine-local: workers on other hosts keep their own
    return _jsonable(defining)


def _differences(study: StudyConfig, definition: dict, stored: dict) -> list[str]:
    """The sections of ``definition`` that differ from the ``stored`` one. A setting newer than the
    stored study counts as unchanged while it holds its default, so a study stays resumable."""
    differ = []
    for key, value in definition.items():
        old = stored.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            defaults = {f.name: _default(f) for f in fields(getattr(study, key))}
            new = {name: defaults[name] for name in value.keys() - old.keys() if defaults.get(name) is not MISSING}
            old = {**old, **_jsonable(new)}
        if value != old:
            differ.append(key)
    return sorted(differ)


def _default(f: Field) -> object:
    if f.default is not MISSING:
        return f.default
    return MISSING if f.default_factory is MISSING else f.default_factory()


def _jsonable(value):  # tuples become lists, as they come back from the storage
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _NoInterruptReport(logging.Filter):
    """Drops Optuna's "Trial N failed ... KeyboardInterrupt" warning and its traceback: on Ctrl-C
    or SIGTERM the worker says "interrupted" in one line and queues the trial again."""

    def filter(self, record: logging.LogRecord) -> bool:
        interrupted = record.exc_info and issubclass(record.exc_info[0], KeyboardInterrupt)
        return not (interrupted or "failed with value None" in record.getMessage())  # (ours never return None)


@contextmanager
def _optuna_warnings_only() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created", "Trial 3 finished ...") repeat what microsearch
    prints itself: silenced while it drives a study, the caller's level restored afterwards."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet = _NoInterruptReport()
    handlers = list(logging.getLogger("optuna").handlers)  # the records come from child loggers
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
        optuna.logging.set_verbosity(level)


def artifact_store(study: StudyConfig) -> FileSystemArtifactStore:
    study.artifacts_dir.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(study.artifacts_dir))


def open_study(study: StudyConfig, storage_url: str | None = None, sampler_seed: int | None = None) -> optuna.Study:
    """Create the study on its storage (or load it), enqueue starting points once.

    ``sampler_seed`` seeds this process's sampler. Workers draw a fresh one each start (see
    ``run_worker``): a seed shared by two processes, or reused on a resume, replays the same
    random start-up points, so the study would spend trials on parameter sets it has already run.
    """
    check_enqueue(study)  # before anything is written to the storage
    storage = open_storage(storage_url or study.storage_url, study.heartbeat, study.grace)
    with warnings.catch_warnings():  # group=True is "experimental" but is what conditional spaces need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True, group=True, constant_liar=True)
    pruner = TargetPruner(
        study.trial_target, study.pruner.margin, study.pruner.warmup_epochs, study.pruner.min_feasible
    )
    with _optuna_warnings_only():
        optuna_study = optuna.create_study(
            study_name=study.name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    definition = _definition(study)
    stored = optuna_study.user_attrs.get("definition")
    if stored is None:
        optuna_study.set_user_attr("definition", definition)
        optuna_study.set_user_attr("study_file", str(study.path))
        _describe_for_dashboard(optuna_study, study)
        for point in [*starting_points(study), *study.enqueue]:
            optuna_study.enqueue_trial(point, skip_if_exists=True)
    elif differ := _differences(study, definition, stored):
        raise StudyError(
            f"study {study.name!r} on this storage was created from a different definition "
            f"(differs in: {', '.join(differ)}); use another study name or storage"
        )
    return optuna_study


def existing_storage(study: StudyConfig, storage_url: str | None = None) -> optuna.storages.BaseStorage:
    """The storage that holds the study, for commands that only read: nothing is created."""
    storage = open_storage(storage_url or study.storage_url, study.heartbeat, study.grace, create=False)
    names = optuna.get_all_study_names(storage)
    if study.name not in names:
        raise StudyError(
            f"no study named {study.name!r} in that storage yet (it has: {names or 'none'}); "
            "run `microsearch search` first"
        )
    return storage


def load_existing(study: StudyConfig, storage_url: str | None = None) -> optuna.Study:
    """The stored study, for reading (report, Pareto figure, retrain)."""
    with _optuna_warnings_only():
        return optuna.load_study(study_name=study.name, storage=existing_storage(study, storage_url))


def _describe_for_dashboard(optuna_study: optuna.Study, study: StudyConfig) -> None:
    """The study note optuna-dashboard shows: the methodology and the best feasible trial so far.

    The dashboard's own "Best Trial" badge comes from the storage and ignores the accuracy
    constraint, so the note names the feasible best.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not optuna_study.metric_names:
            optuna_study.set_metric_names(["score"])
    if not importlib.util.find_spec("optuna_dashboard"):  # optional where only the search runs
        return
    from optuna_dashboard import save_note

    best = best_feasible(optuna_study)
    status = (
        f"**Best feasible trial so far: {best.number}**, score {best.value:.5f}, validation accuracy "
        f"{best.user_attrs['val_acc']:.2%}."
        if best
        else f"No trial has reached its target ({study.trial_target:.0%} validation accuracy at the trial budget) yet."
    )
    save_note(
        optuna_study,
        f"{status} (The dashboard's Best Trial badge ignores the accuracy constraint.)\n\n{describe.markdown(study)}",
    )


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial  # Optuna 5: feasible trials only
    except ValueError:
        return None


def study_data(study: StudyConfig, log: Callable[[str], None] = print) -> Dataset:
    """The study's images, checked before anything is stored: the searched networks have ten
    outputs, and the target and the score's references are CIFAR-10's."""
    data = load_data(study.data)
    outputs = create_model(MODEL).fc.out_features
    if len(data.classes) > outputs:
        raise StudyError(
            f"{study.data.source} has {len(data.classes)} classes; the searched networks classify {outputs}"
        )
    if study.data.source.startswith("imagefolder") and data.classes != CIFAR10_CLASSES:
        log(
            f"warning: {study.data.source} has the classes {data.classes}, not CIFAR-10's "
            f"{CIFAR10_CLASSES}: the target and the score's references are for CIFAR-10"
        )
    return data


def run_worker(
    study: StudyConfig,
    storage_url: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    worker: int = 0,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """One worker: checks storage and data first, then runs trials. Example:
    ``run_worker(load_study("studies/smoke.toml"), n_trials=4)``."""
    sampler_seed = secrets.randbits(31)
    data = study_data(study, log)  # a wrong source fails here, before the study is stored
    optuna_study = open_study(study, storage_url, sampler_seed)
    n_trials = n_trials or study.budget.trials
    timeout = timeout or study.budget.timeout
    tag = f"w{worker} " if worker else ""
    started, done = time.perf_counter(), []

    def after_trial(s: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done.append(trial.number)
        _describe_for_dashboard(s, study)
        best = best_feasible(s)
        elapsed = time.perf_counter() - started
        left = elapsed / len(done) * (n_trials - len(done))
        if timeout:
            left = min(left, max(0.0, timeout - elapsed))
        outcome = _outcome(trial)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no feasible trial yet"
        log(
            f"[{tag}trial {trial.number}] {outcome} | {best_text} | {len(done)}/{n_trials} trials, "
            f"{elapsed:.0f}s, about {left:.0f}s left"
        )

    log(f"[{tag}worker] sampler seed {sampler_seed} (recorded with each trial)")
    note = stale_note(study, optuna_study)
    if note:
        log(f"[{tag}worker] note: {note}")
    teacher = ensure_teacher(study, data, log)
    if teacher is not None:
        optuna_study.set_user_attr("teacher", teacher_record(study, teacher[1]))
    teacher_model = None if teacher is None else teacher[0]
    start = start_model(study, teacher_model, log)
    objective = Objective(study, data, log, tag, artifact_store(study), sampler_seed, teacher_model, start)
    try:
        with _optuna_warnings_only():
            optuna_study.optimize(
                objective,
                n_trials=n_trials,
                timeout=timeout,
                callbacks=[after_trial],
                catch=(TrainingDiverged,),
                gc_after_trial=True,
            )
    except KeyboardInterrupt:
        if objective.current is not None:
            with _optuna_warnings_only():
                requeue_interrupted(optuna_study, objective.current)
        raise
    return optuna_study


def requeue_interrupted(optuna_study: optuna.Study, number: int) -> None:
    """Mark an interrupted trial failed (if Optuna could not) and queue it again, so that a
    restarted worker runs it with the same parameters."""
    trial = optuna_study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    if trial.state == TrialState.FAIL:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; it is what heartbeats use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback()(optuna_study, trial)


def stale_running(optuna_study: optuna.Study, minutes: float) -> list[optuna.trial.FrozenTrial]:
    """Trials RUNNING for more than ``minutes``: on a journal file (no heartbeat) a killed
    worker's trial stays RUNNING forever."""
    now = datetime.datetime.now()
    return [
        t
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > minutes * 60
    ]


def stale_note(study: StudyConfig, optuna_study: optuna.Study, minutes: float = 120) -> str | None:
    """What to tell a user whose study has trials RUNNING for hours, or None."""
    stale = stale_running(optuna_study, minutes)
    if not stale:
        return None
    return (
        f"{len(stale)} trial(s) ({', '.join(str(t.number) for t in stale)}) have been RUNNING for more than "
        f"{minutes:.0f} min; if their workers are gone: microsearch requeue {study.path} "
        f"--running-older-than {minutes:.0f} [--storage URL]"
    )


def _outcome(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        feasible = "feasible" if is_feasible(trial) else "infeasible"
        return f"score {trial.value:.4f}  val {trial.user_attrs['val_acc']:.1%}  {feasible}"
    if trial.state == TrialState.PRUNED:
        return "stopped early: below every feasible trial's curve"
    return trial.state.name.lower()


def summary(study: optuna.Study, target: float) -> str:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    by_state = {s.name.lower(): states.count(s) for s in TrialState if states.count(s)}
    best = best_feasible(study)
    lines = [f"study {study.study_name}: " + ", ".join(f"{c} {n}" for n, c in by_state.items())]
    if best is None:
        lines.append(f"no trial reached {target:.0%} validation accuracy yet")
    else:
        a = best.user_attrs["audit"]
        lines.append(
            f"best feasible: trial {best.number}  score {score_terms(a, 4)}  "
            f"val {best.user_attrs['val_acc']:.2%}  {counts(a)}"
        )
        lines.append("  " + params_inline(best.params))
    return "\n".join(lines)
