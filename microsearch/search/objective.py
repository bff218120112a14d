"""One trial: build -> train with quantization-aware layers -> prune -> fine-tune -> validate -> audit."""

import time
from collections.abc import Callable
from dataclasses import asdict, replace

import optuna
import torch
from torch import nn

from microsearch import code_version
from microsearch.compression import li_prune, make_permanent_, prune_layers_, quantize_, thinet_prune
from microsearch.evaluation import audit
from microsearch.evaluation.data import Dataset
from microsearch.evaluation.loader import DeviceLoader
from microsearch.evaluation.train import EpochStats, device_name, evaluate, resolve_device, train
from microsearch.models import create_model
from microsearch.search.space import MODEL, TrialPlan, suggest
from microsearch.search.study import StudyConfig


def set_feasibility(trial: optuna.Trial, accuracy: float, target: float) -> None:
    """Record ``target - accuracy`` (feasible when <= 0) as the Optuna 5 constraint and, for
    optuna-dashboard, which reads only the legacy list, as the ``constraints`` system attribute."""
    trial.set_constraint("accuracy", target - accuracy)
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [target - accuracy])


def _li(model: nn.Module, filters: dict[str, float], objective: "Objective") -> nn.Module:
    return li_prune(model, filters)


def _thinet(model: nn.Module, filters: dict[str, float], objective: "Objective") -> nn.Module:
    images = next(iter(DeviceLoader(objective.data.train, 256, objective.device)))[0]
    return thinet_prune(model, filters, images)


FILTER_PRUNERS: dict[str, Callable[[nn.Module, dict[str, float], "Objective"], nn.Module]] = {
    "li": _li,
    "thinet": _thinet,
}


class Objective:
    """The study's objective: returns the audited score of the compressed model."""

    def __init__(
        self, study: StudyConfig, data: Dataset, log: Callable[[str], None] = print, tag: str = ""
    ) -> None:
        self.study, self.data, self.log, self.tag = study, data, log, tag
        self.device = resolve_device(study.device)

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        plan = suggest(trial, self.study)
        trial.set_user_attr("config", plan.to_dict())
        history: list[dict] = []
        total_epochs = plan.train.epochs + self.study.budget.finetune_epochs

        def report(stats: EpochStats, offset: int = 0) -> None:
            step = stats.epoch + offset
            history.append({**asdict(stats), "step": step})
            trial.report(1 - stats.val_acc, step)
            elapsed = time.perf_counter() - start
            self.log(
                f"[{self.tag}trial {trial.number}] epoch {step}/{total_epochs}  val {stats.val_acc:.1%}  "
                f"{elapsed:.0f}s  trial eta {elapsed / step * (total_epochs - step):.0f}s"
            )
            if trial.should_prune():
                trial.set_user_attr("history", history)
                set_feasibility(trial, stats.val_acc, self.study.target)
                raise optuna.TrialPruned(
                    f"val {stats.val_acc:.1%} at epoch {step} is below every feasible trial"
                )

        torch.manual_seed(plan.train.seed)
        model = create_model(MODEL, **plan.model)
        quantize_(model, plan.quant)
        train(model, self.data, plan.train, on_epoch=report)
        model = self.compress(model, plan, lambda s: report(s, offset=plan.train.epochs))
        result = evaluate(model, self.data.val, self.device, plan.train.tta)
        score = audit(model, rule=self.study.rule, passes=result.passes)
        set_feasibility(trial, result.accuracy, self.study.target)
        attrs = {
            "val_acc": result.accuracy,
            "passes": result.passes,
            "param_term": score.param_term,
            "ops_term": score.ops_term,
            "params": score.raw_params,
            "nonzero_params": score.nonzero_params,
            "ops": score.raw_ops,
            "layers": [asdict(layer) for layer in score.layers],
            "history": history,
            "seconds": time.perf_counter() - start,
            "device": device_name(self.device),
            "version": code_version(),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return score.score

    def compress(
        self, model: nn.Module, plan: TrialPlan, on_epoch: Callable[[EpochStats], None]
    ) -> nn.Module:
        """Filter pruning, then magnitude pruning, then fine-tuning with the masks fixed."""
        if any(plan.filters.values()):
            model = FILTER_PRUNERS[self.study.compression.structured](model, plan.filters, self)
        if plan.sparsity:
            prune_layers_(model, plan.sparsity)
        budget = self.study.budget
        if budget.finetune_epochs:
            tune = replace(plan.train, epochs=budget.finetune_epochs, lr=budget.finetune_lr, warmup=0.0)
            train(model, self.data, tune, on_epoch=on_epoch)
        make_permanent_(model)
        return model
