"""The accuracy-vs-score picture of a study, as HTML and stored in the study for optuna-dashboard."""

from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from microsearch.evaluation.plots import pareto_figure, write_html
from microsearch.evaluation.views import counts, params_inline, score_terms
from microsearch.search.pruner import is_feasible
from microsearch.search.study import StudyConfig


def _describe(trial: optuna.trial.FrozenTrial) -> str:
    a = trial.user_attrs["audit"]
    return (
        f"trial {trial.number}: score {score_terms(a, 4)}<br>val {trial.user_attrs['val_acc']:.2%}, {counts(a)}"
        f"<br>{params_inline(trial.params, 90)}"
    )


def trial_points(study: optuna.Study) -> list[dict]:
    return [
        {
            "number": t.number,
            "score": t.value,
            "val_acc": t.user_attrs["val_acc"],
            "feasible": is_feasible(t),
            "text": _describe(t),
        }
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "audit" in t.user_attrs
    ]


def final_point(card: dict) -> dict:
    """A retrained model's card as a point of the accuracy-vs-score figure."""
    a = card["audit"]
    return {
        "score": a["score"],
        "val_acc": card["val_acc"],
        "text": f"final model (trial {card['trial']} retrained): score {score_terms(a, 4)}, val {card['val_acc']:.2%}",
    }


def save_pareto(
    study: optuna.Study,
    config: StudyConfig,
    out: str | Path,
    final: dict | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the figure to ``out`` and store it in the study (optuna-dashboard shows it; a
    read-only storage keeps only the file). ``final``: the card of the retrained final model,
    drawn with the trials."""
    from optuna_dashboard import save_plotly_graph_object

    points = trial_points(study)
    if not points:
        raise ValueError(f"study {study.study_name!r} has no completed trial to plot yet")
    fig = pareto_figure(
        points,
        config.target,
        f"{study.study_name}: accuracy vs score ({len(points)} trials)",
        config.trial_target,
        None if final is None or final.get("val_acc") is None else final_point(final),
    )
    path = write_html(fig, out)
    try:
        save_plotly_graph_object(study, fig)
        log(f"stored the figure in study {study.study_name!r} for optuna-dashboard")
    except optuna.exceptions.StorageInternalError as e:
        log(f"the figure is not stored in the study: its storage refused the write ({e.__cause__ or e})")
    return path
