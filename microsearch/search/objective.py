"""One trial: build -> train with quantization-aware layers -> prune -> fine-tune -> validate -> audit.

``train_and_compress`` is the whole recipe of a plan; the search runs it on the training images and
validates, ``retrain`` runs it on training + validation images and tests once.
"""

import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from torch import nn

from microsearch import code_version
from microsearch.checkpoint import save_model
from microsearch.compression import (
    FILTER_PRUNERS,
    FilterContext,
    make_permanent_,
    prune_layers_,
    quantize_,
    snap_weights_,
)
from microsearch.evaluation import Score, audit
from microsearch.evaluation.data import Dataset
from microsearch.evaluation.loader import sample_images
from microsearch.evaluation.train import (
    EpochStats,
    device_name,
    evaluate,
    precision_name,
    print_progress,
    resolve_device,
    resolve_precision,
    train,
)
from microsearch.evaluation.views import params_markdown, score_markdown
from microsearch.models import create_model, same_layers
from microsearch.search.space import MODEL, TrialPlan, suggest
from microsearch.search.study import StudyConfig

EpochHook = Callable[[EpochStats], None] | None


def start_from(plan: TrialPlan, study: StudyConfig, start: nn.Module | None) -> nn.Module | None:
    """The trained float network a candidate starts from (``[distill] init``): ``start`` (see
    ``teacher.start_model``), where the candidate's float network has exactly its layers (names and
    shapes); None: from scratch."""
    if not study.distill.init or start is None:
        return None
    return start if same_layers(create_model(MODEL, **plan.model), start) else None


def init_name(study: StudyConfig, init: nn.Module | None) -> str:
    """What a candidate started from, as trials and model cards record it."""
    return "scratch" if init is None else ("init_file" if study.distill.init_file else "teacher")


def train_and_compress(
    plan: TrialPlan,
    study: StudyConfig,
    data: Dataset,
    on_epoch: EpochHook = None,
    on_finetune_epoch: EpochHook = None,
    checkpoints: Path | None = None,
    teacher: nn.Module | None = None,
    finetune_epochs: int | None = None,
    init: nn.Module | None = None,
) -> nn.Module:
    """Build the planned model, train it quantization-aware, remove filters, zero weights,
    fine-tune with the masks fixed, make the pruning permanent and set each quantized weight to
    its quantized value (``snap_weights_``). With ``checkpoints`` (a
    folder), both trainings resume after their last finished epoch; pruning is deterministic.
    ``teacher``: the study's distillation teacher (when the plan distils). ``finetune_epochs``
    overrides the study's (a retrain's budget). ``init``: a trained float network with the
    model's layers (``start_from``) whose weights it starts from, quantized from the first epoch."""
    device = resolve_device(plan.train.device)
    torch.manual_seed(plan.train.seed)
    model = create_model(MODEL, **plan.model)
    config = plan.train
    if init is not None:
        model.load_state_dict(init.state_dict())
        config = replace(config, float_warmup=False)
    quantize_(model, plan.quant)
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoints and checkpoints / "train.pt"
    train(model, data, config, on_epoch, print_progress, checkpoint, teacher)
    if any(plan.filters.values()):
        images = partial(sample_images, data.train, device)  # ThiNet's activations
        model = FILTER_PRUNERS[study.compression.structured](model, plan.filters, FilterContext(images))
    if plan.sparsity:
        prune_layers_(model, plan.sparsity)
    budget = study.budget
    epochs = budget.finetune_epochs if finetune_epochs is None else finetune_epochs
    if epochs:
        tune = replace(config, epochs=epochs, lr=budget.finetune_lr, warmup=0.0)
        checkpoint = checkpoints and checkpoints / "finetune.pt"
        train(model, data, tune, on_finetune_epoch, print_progress, checkpoint, teacher)
    make_permanent_(model)
    snap_weights_(model)  # what it runs on: zeros counted as zeros, stored as int8 levels
    return model


def set_feasibility(trial: optuna.Trial, accuracy: float, target: float) -> None:
    """Record ``target - accuracy`` (feasible when <= 0) as the Optuna 5 constraint and, for
    optuna-dashboard, which reads only the legacy list, as the ``constraints`` system attribute."""
    trial.set_constraint("accuracy", target - accuracy)
    # Optuna 5 has no public setter for system attributes; this one call writes the legacy key
    # through the storage (test_retrain_report checks that the dashboard still reads it).
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [target - accuracy])


def _note(trial: optuna.Trial, body: str) -> None:
    """A markdown note optuna-dashboard shows with the trial (skipped where it is not installed)."""
    if importlib.util.find_spec("optuna_dashboard"):
        from optuna_dashboard import save_note

        save_note(trial, body)


class Objective:
    """The study's objective: returns the audited score of the compressed model.

    Completed trials store their model file in ``artifacts`` (optuna-dashboard lists it).
    """

    def __init__(
        self,
        study: StudyConfig,
        data: Dataset,
        log: Callable[[str], None] = print,
        tag: str = "",
        artifacts: FileSystemArtifactStore | None = None,
        sampler_seed: int | None = None,
        teacher: nn.Module | None = None,
        start: nn.Module | None = None,
    ) -> None:
        self.study, self.data, self.log, self.tag, self.artifacts = study, data, log, tag, artifacts
        self.sampler_seed, self.teacher, self.start = sampler_seed, teacher, start
        self.device = resolve_device(study.device)
        self.current: int | None = None  # number of the trial being run, for an interrupted worker

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        start = time.perf_counter()
        plan = suggest(trial, self.study)
        trial.set_user_attr("config", plan.to_dict())
        trial.set_user_attr("sampler_seed", self.sampler_seed)
        history: list[dict] = []
        total_epochs = plan.train.epochs + self.study.budget.finetune_epochs

        def report(stats: EpochStats, offset: int = 0) -> None:
            step = stats.epoch + offset
            history.append({**asdict(stats), "step": step})
            trial.set_user_attr("history", history)  # the learning curve the pruner reads
            elapsed = time.perf_counter() - start
            self.log(
                f"[{self.tag}trial {trial.number}] epoch {step}/{total_epochs}  val {stats.val_acc:.1%}  "
                f"{elapsed:.0f}s  trial eta {elapsed / step * (total_epochs - step):.0f}s"
            )
            if trial.should_prune():
                set_feasibility(trial, stats.val_acc, self.study.trial_target)
                raise optuna.TrialPruned(f"val {stats.val_acc:.1%} at epoch {step} is below every feasible trial")

        init = start_from(plan, self.study, self.start)
        trial.set_user_attr("init", init_name(self.study, init))
        model = train_and_compress(
            plan,
            self.study,
            self.data,
            report,
            lambda s: report(s, offset=plan.train.epochs),
            teacher=self.teacher,
            init=init,
        )
        result = evaluate(model, self.data.val, self.device, plan.train.tta, plan.train.precision)
        score = audit(model, rule=self.study.rule, passes=result.passes)
        set_feasibility(trial, result.accuracy, self.study.trial_target)
        attrs = {
            "val_acc": result.accuracy,
            "audit": score.to_dict(),  # the one record every view renders (microsearch.evaluation.views)
            "history": history,
            "seconds": time.perf_counter() - start,
            "device": device_name(self.device),
            "precision": precision_name(resolve_precision(plan.train.precision, self.device)),
            "version": code_version(),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self._store(trial, model, score, result.accuracy, plan)
        return score.score

    def _store(self, trial: optuna.Trial, model: nn.Module, score: Score, accuracy: float, plan: TrialPlan) -> None:
        feasible = "feasible" if accuracy >= self.study.trial_target else "infeasible"
        _note(
            trial,
            f"## Trial {trial.number}: score {score.score:.5f}, validation accuracy {accuracy:.2%} "
            f"({feasible} for the trial target {self.study.trial_target:.0%})\n\n"
            f"{params_markdown(trial.params)}\n\n### Score breakdown\n\n{score_markdown(score.to_dict())}\n",
        )
        if self.artifacts is None:
            return
        meta = {
            "study": self.study.name,
            "trial": trial.number,
            "val_acc": accuracy,
            "passes": score.passes,
            "rule": score.rule,
            "score": score.score,
            "config": plan.to_dict(),
            "version": code_version(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            save_model(path, model.cpu(), meta)
            trial.set_user_attr(
                "artifact_id",
                upload_artifact(artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial),
            )
