import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from microsearch.search import TargetPruner

TARGET = 0.90
# Accuracy per epoch. A big model that finishes well above the target, and a small one that
# learns more slowly but just reaches it: both are feasible.
BIG = [0.55, 0.75, 0.86, 0.93, 0.95]
SMALL_FEASIBLE = [0.40, 0.62, 0.78, 0.88, 0.91]
ON_TRACK = [0.41, 0.63, 0.79, 0.88, 0.91]  # another small model, below the median all along
HOPELESS = [0.20, 0.30, 0.35, 0.38, 0.40]
OTHERS = [[0.6, 0.8, 0.9, 0.95, 0.96], [0.58, 0.79, 0.9, 0.94, 0.95]]  # more big models


def _history(curve: list[float]) -> list[dict]:
    return [{"step": e + 1, "val_acc": a} for e, a in enumerate(curve)]


def _finished(curve: list[float]):
    return create_trial(
        state=TrialState.COMPLETE,
        value=0.1,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"history": _history(curve)},
        system_attrs={"constraints:accuracy": TARGET - curve[-1]},
    )


def _study(pruner):
    study = optuna.create_study(pruner=pruner)
    for curve in [BIG, SMALL_FEASIBLE, *OTHERS]:
        study.add_trial(_finished(curve))
    return study


def _stopped_at(study, curve):
    """Epoch at which the study's pruner stops a trial with this learning curve, or None."""
    trial = study.ask()
    for epoch in range(1, len(curve) + 1):
        trial.set_user_attr("history", _history(curve[:epoch]))  # as the objective does each epoch
        if trial.should_prune():
            return epoch
    return None


def test_target_pruner_stops_the_hopeless_and_keeps_the_small_model_on_track():
    study = _study(TargetPruner(TARGET, margin=0.05, warmup_steps=1))
    assert _stopped_at(study, HOPELESS) == 2  # the first epoch after the warm-up
    assert _stopped_at(study, ON_TRACK) is None


def test_nothing_is_stopped_before_a_feasible_trial_exists_or_during_warmup():
    study = optuna.create_study(pruner=TargetPruner(TARGET, warmup_steps=1))
    study.add_trial(_finished(HOPELESS))  # infeasible: no reference
    assert _stopped_at(study, HOPELESS) is None
    study = _study(TargetPruner(TARGET, warmup_steps=4))
    assert _stopped_at(study, HOPELESS) == 5


def test_floor_is_the_lowest_feasible_curve_scaled_to_the_target():
    # at epoch 2: BIG 0.75 x 0.90/0.95 = 0.7105, SMALL_FEASIBLE 0.62 x 0.90/0.91 = 0.6132 (the
    # lowest), OTHERS 0.8 x 0.90/0.96 = 0.75 and 0.79 x 0.90/0.95 = 0.7484
    assert TargetPruner(TARGET).floor(_study(TargetPruner(TARGET)), 2) == pytest.approx(0.6131868, abs=1e-7)
    assert TargetPruner(TARGET, min_feasible=5).floor(_study(TargetPruner(TARGET)), 2) is None  # only 4
