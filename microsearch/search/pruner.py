"""A pruner that knows the accuracy target.

Trials report their validation *error* (1 - accuracy) each epoch, so that lower is better like the
score. For every feasible trial (one that reached the target) the pruner scales its learning curve
so that it ends exactly at the target: the curve of a trial that just makes it. A running trial
is stopped at epoch k when its accuracy is more than ``margin`` below the lowest such curve at k.

A small model that learns more slowly than the median, but fast enough to reach the target, is
kept; a median rule would stop it.
"""

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


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
            if is_feasible(t) and step in t.intermediate_values:
                final = 1 - t.intermediate_values[t.last_step]
                scaled.append((1 - t.intermediate_values[step]) * min(1.0, self.target / max(final, 1e-9)))
        return min(scaled) if len(scaled) >= self.min_feasible else None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step <= self.warmup_steps:
            return False
        floor = self.floor(study, step)
        return floor is not None and 1 - trial.intermediate_values[step] < floor - self.margin
