"""A pruner that knows the accuracy target.

Trials record their validation accuracy after every epoch in their ``history`` attribute, not as
Optuna intermediate values: Optuna gives a pruned trial its last intermediate value as its value,
which would put accuracies among the scores on the dashboard's score axis. For every feasible
trial (one that reached the target) the pruner scales its learning curve so that it ends exactly
at the target: the curve of a trial that just makes it. A running trial is stopped at epoch k when
its accuracy is more than ``margin`` below the lowest such curve at k.

A small model that learns more slowly than the median, but fast enough to reach the target, is
kept; a median rule would stop it.
"""

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def curve(trial: FrozenTrial) -> dict[int, float]:
    """Validation accuracy by step (training epochs, then fine-tuning epochs) so far."""
    return {h["step"]: h["val_acc"] for h in trial.user_attrs.get("history", [])}


class TargetPruner(BasePruner):
    def __init__(self, target: float, margin: float = 0.05, warmup_steps: int = 2, min_feasible: int = 1) -> None:
        self.target = target
        self.margin = margin
        self.warmup_steps = warmup_steps
        self.min_feasible = min_feasible

    def floor(self, study: optuna.Study, step: int) -> float | None:
        """Lowest accuracy at ``step`` of the feasible curves scaled to end at the target; None
        while fewer than ``min_feasible`` feasible trials reached ``step``."""
        scaled = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            accuracy = curve(t)
            if is_feasible(t) and step in accuracy:
                final = accuracy[max(accuracy)]
                scaled.append(accuracy[step] * min(1.0, self.target / max(final, 1e-9)))
        return min(scaled) if len(scaled) >= self.min_feasible else None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        accuracy = curve(trial)
        step = max(accuracy, default=0)
        if step <= self.warmup_steps:
            return False
        floor = self.floor(study, step)
        return floor is not None and accuracy[step] < floor - self.margin
