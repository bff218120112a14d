"""The study report: one self-contained HTML page (plots embedded) and the same content in markdown."""

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from microsearch.evaluation.plots import pareto_figure, sweep_figure
from microsearch.evaluation.views import cell, counts, layer_table, markdown_table, score_line, score_terms
from microsearch.search import describe
from microsearch.search.pareto import final_point, trial_points
from microsearch.search.pruner import curve, is_feasible
from microsearch.search.retrain import test_accuracy, training_words
from microsearch.search.run import best_feasible, stale_note
from microsearch.search.study import StudyConfig


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[Any]]] | None = None
    figure: Any = None  # a plotly figure, embedded in the HTML


def _trials_table(study: optuna.Study) -> tuple[list[str], list[list[Any]]]:
    head = ["trial", "state", "score", "param term", "ops term", "val acc", "params", "nonzero", "feasible", "seconds"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs.get("audit", {})  # completed trials only
        done = t.state == TrialState.COMPLETE
        accuracy = curve(t)  # a stopped trial's accuracy is its curve's last point
        acc = t.user_attrs.get("val_acc", accuracy[max(accuracy)] if accuracy else None)
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                t.value if done else "",
                a.get("param_term", ""),
                a.get("ops_term", ""),
                f"{acc:.2%}" if acc is not None else "",
                a.get("params", ""),
                a.get("nonzero_params", ""),
                "yes" if is_feasible(t) else "no",
                t.user_attrs.get("seconds", ""),
            ]
        )
    rows.sort(key=lambda r: (r[1] != "complete", r[2] if r[1] == "complete" else r[0]))  # by score, then number
    return head, rows


def sections(study: StudyConfig, optuna_study: optuna.Study, sweeps: Path | None, model: Path | None) -> list[Section]:
    trials = optuna_study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    best = best_feasible(optuna_study)
    summary = ", ".join(f"{n} {s}" for s, n in states.items() if n)
    best_text = (
        f"Best feasible trial: {best.number}, score {best.value:.5f}, validation accuracy "
        f"{best.user_attrs['val_acc']:.2%}."
        if best
        else f"No trial has reached the trial target ({study.trial_target:.0%}) yet."
    )
    stale = stale_note(study, optuna_study)
    out = [
        Section("Summary", [f"{len(trials)} trials ({summary}).", best_text, *([f"Note: {stale}."] if stale else [])]),
        Section(
            "Methodology",
            [describe.goal(study), describe.recipe(study), describe.distillation(study)],
            table=(["parameter", "range"], [list(r) for r in describe.space_rows(study)]),
        ),
    ]
    points = trial_points(optuna_study)
    if points:
        card = json.loads((model / "model_card.json").read_text()) if model is not None else None
        final = final_point(card) if card and card.get("val_acc") is not None else None
        fig = pareto_figure(points, study.target, f"{study.name}: accuracy vs score", study.trial_target, final)
        out.append(
            Section(
                "Accuracy vs score",
                [
                    "Every completed trial at the trial budget; the dashed line is the final model's accuracy "
                    "target"
                    + (", the dotted one the trial target" if study.trial_target != study.target else "")
                    + ", the red staircase the feasible Pareto front"
                    + (", the diamond the retrained final model" if final else "")
                    + ". Hover a point for its configuration."
                ],
                figure=fig,
            )
        )
    out.append(Section("Trials", table=_trials_table(optuna_study)))
    if model is not None:
        card = json.loads((model / "model_card.json").read_text())
        a = card["audit"]
        val = card["val_acc"]
        out.append(
            Section(
                f"Final model (trial {card['trial']}, retrained)",
                [
                    (f"Validation accuracy {val:.2%} ({card['data']['val_images']:,} held-out images); " if val else "")
                    + f"test accuracy {test_accuracy(card)}.",
                    f"Score {score_terms(a)} ({card['rule']}); {counts(a)}. The table gives every layer's "
                    "parameters, nonzero parameters, sparsity (pruned weights and quantized weights that "
                    "round to zero), weight/activation bits and operations.",
                    f"Retrained {training_words(card)}, on {card['data']['train_images']:,} images "
                    f"in {card['seconds']:.0f} s on {card['device']} ({card['precision']}). "
                    f"At search time the trial had {card['search']['val_acc']:.2%} validation "
                    f"accuracy at score {card['search']['score']:.5f}.",
                ],
                table=layer_table(a),
            )
        )
        out.append(
            Section(
                "Final model: hyperparameters",
                ["The trial's sampled values; the retrain used them with the budget above."],
                table=(["parameter", "value"], [[k, v] for k, v in card["hyperparameters"].items()]),
            )
        )
    elif best is not None:
        audit = best.user_attrs["audit"]
        out.append(
            Section(
                f"Best trial {best.number} (search-time model)",
                [
                    "Not retrained yet: `microsearch retrain` gives the final model and its test accuracy.",
                    score_line(audit),
                ],
                table=layer_table(audit),
            )
        )
    if sweeps is not None:
        rows = json.loads((sweeps / "sweep.json").read_text())
        keys = ["method", "ratio", "val_acc", "score", "params", "nonzero_params", "sparsity", "finetune_epochs"]
        out.append(
            Section(
                "Pruning sweeps",
                ["Accuracy and audited score of a trained model pruned at several ratios, one line per method."],
                table=(keys, [[r[k] for k in keys] for r in rows]),
                figure=sweep_figure(rows),
            )
        )
    return out


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}pre{background:#f7f7f7;padding:1em;
overflow-x:auto;font-size:.8em}h1{margin-bottom:.2em}"""


def to_html(title: str, parts: list[Section]) -> str:
    body, plotly_included = [], False
    for s in parts:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        if s.figure is not None:
            body.append(s.figure.to_html(full_html=False, include_plotlyjs=not plotly_included))
            plotly_included = True
        if s.table:
            head, rows = s.table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in r) + "</tr>" for r in rows]
            body.append("</table>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>\n"
    )


def to_markdown(title: str, parts: list[Section]) -> str:
    out = [f"# {title}\n"]
    for s in parts:
        out.append(f"## {s.title}\n")
        out += [f"{p}\n" for p in s.paragraphs]
        if s.figure is not None:
            out.append("(Interactive plot in report.html.)\n")
        if s.table:
            out += [markdown_table(*s.table), ""]
    return "\n".join(out) + "\n"


def write_report(
    study: StudyConfig,
    optuna_study: optuna.Study,
    out: str | Path,
    sweeps: Path | None = None,
    model: Path | None = None,
) -> tuple[Path, Path]:
    """Write ``out/report.html`` and ``out/report.md``."""
    for folder, needed in ((sweeps, "sweep.json"), (model, "model_card.json")):
        if folder is not None and not (folder / needed).is_file():
            raise FileNotFoundError(f"no {needed} in {folder}")
    parts = sections(study, optuna_study, sweeps, model)
    title = f"microsearch report: study {study.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(to_html(title, parts))
    (out / "report.md").write_text(to_markdown(title, parts))
    return out / "report.html", out / "report.md"
