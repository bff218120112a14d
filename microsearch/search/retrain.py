"""Retrain a trial into a final model: the exact configuration, all training images, one test."""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.trial import FixedTrial
from torch import nn

from microsearch import code_version
from microsearch.checkpoint import save_model
from microsearch.evaluation import audit
from microsearch.evaluation.data import Dataset, load_data
from microsearch.evaluation.train import (
    EpochStats,
    device_name,
    evaluate,
    precision_name,
    resolve_device,
    resolve_precision,
)
from microsearch.search.objective import score_table, train_and_compress
from microsearch.search.run import best_feasible, open_study
from microsearch.search.space import MODEL, suggest
from microsearch.search.study import StudyConfig, StudyError


def pick_trial(study: optuna.Study, which: str) -> optuna.trial.FrozenTrial:
    """``best`` (the best feasible trial) or a trial number."""
    if which == "best":
        best = best_feasible(study)
        if best is None:
            raise StudyError(f"study {study.study_name!r} has no feasible trial yet; pick one with --trial N")
        return best
    try:
        number = int(which)
    except ValueError:
        raise StudyError(f"--trial must be 'best' or a trial number, got {which!r}") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials or not trials[number].params:
        raise StudyError(f"study {study.study_name!r} has no trial {number} with parameters")
    return trials[number]


def retrain(
    study: StudyConfig,
    out: str | Path,
    storage_url: str | None = None,
    which: str = "best",
    epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Rebuild a trial's plan, train it on train + validation images, compress it, test it once
    (where the source has a test split), and write ``out/model.pt``, ``out/model_card.json`` and
    ``out/model_card.md``."""
    trial = pick_trial(open_study(study, storage_url), which)
    data = load_data(replace(study.data, val_size=0))  # model selection is over: use every image
    if data.test is None:
        log(f"{study.data.source} has no test split: the card will say how to measure test accuracy")
    model, card = train_trial(study, trial, data, Path(out), epochs, log)
    test_once(model, card, data)
    write_model(Path(out), model, card)
    return card


def train_trial(
    study: StudyConfig,
    trial: optuna.trial.FrozenTrial,
    data: Dataset,
    out: Path,
    epochs: int | None = None,
    log: Callable[[str], None] = print,
    checkpoints: Path | None = None,
) -> tuple[nn.Module, dict]:
    """Train and compress a trial's exact plan on ``data.train`` (``epochs`` overrides its training
    budget), validate it on ``data.val`` if there is one, audit it; returns the model and its card
    (test accuracy not measured yet). With ``checkpoints``, an interrupted run resumes."""
    start = time.perf_counter()
    plan = suggest(FixedTrial(trial.params), study)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {epochs}")
        plan = replace(plan, train=replace(plan.train, epochs=epochs))
    device = resolve_device(plan.train.device)
    total = plan.train.epochs + study.budget.finetune_epochs

    def progress(offset: int) -> Callable[[EpochStats], None]:
        def show(s: EpochStats) -> None:
            done = s.epoch + offset
            log(
                f"[retrain trial {trial.number}] epoch {done}/{total}  loss {s.train_loss:.3f}  "
                f"train {s.train_acc:.1%}  val {s.val_acc:.1%}  {s.seconds:.0f}s"
            )

        return show

    log(f"training trial {trial.number} on {len(data.train)} images for {total} epochs")
    model = train_and_compress(plan, study, data, progress(0), progress(plan.train.epochs), checkpoints)
    passes = 2 if plan.train.tta else 1
    val_acc = (
        evaluate(model, data.val, device, plan.train.tta, plan.train.precision).accuracy if len(data.val) else None
    )
    score = audit(model, rule=study.rule, passes=passes)
    tta = " --tta" if plan.train.tta else ""
    card = {
        "study": study.name,
        "trial": trial.number,
        "search": {"val_acc": trial.user_attrs.get("val_acc"), "score": trial.value},
        "model": {
            "name": MODEL,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(model.config).items()},
        },
        "plan": plan.to_dict(),
        "hyperparameters": trial.params,
        "data": {
            "source": study.data.source,
            "val_size": len(data.val),  # with ``seed``: the held-out split ``microsearch evaluate`` rebuilds
            "seed": study.data.seed,
            "train_images": len(data.train),
            "val_images": len(data.val),
            "test_images": 0 if data.test is None else len(data.test),
        },
        "val_acc": val_acc,
        "test_acc": None,
        # How to measure it where the source had no test split: the same images' test split.
        "test_command": f"microsearch evaluate {out / 'model.pt'} --data SOURCE --split test{tta}",
        "passes": passes,
        "rule": score.rule,
        "audit": score.to_dict(),
        "seconds": time.perf_counter() - start,
        "device": device_name(device),
        "precision": precision_name(resolve_precision(plan.train.precision, device)),
        "version": code_version(),
        "command": " ".join(["microsearch", *sys.argv[1:]]),
    }
    return model, card


def test_once(model: nn.Module, card: dict, data: Dataset) -> None:
    """The one evaluation on the test split (where the source has one), into the card."""
    if data.test is not None:
        plan = card["plan"]["train"]
        device = resolve_device(plan["device"])
        card["test_acc"] = evaluate(model, data.test, device, plan["tta"], plan["precision"]).accuracy


def write_model(out: Path, model: nn.Module, card: dict) -> None:
    """``out/model.pt`` (with the card as its metadata), ``model_card.json`` and ``model_card.md``."""
    save_model(out / "model.pt", model.cpu(), {k: v for k, v in card.items() if k != "audit"})
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "model_card.md").write_text(model_card_markdown(card))


def test_accuracy(card: dict) -> str:
    """The card's test accuracy in words, or how to measure it where it was not measured."""
    if card["test_acc"] is None:
        return (
            f"not measured: {card['data']['source']} has no test split; measure it with "
            f"`{card['test_command']}` (SOURCE: a source with the test images)"
        )
    return f"{card['test_acc']:.2%} ({card['data']['test_images']:,} test images, {card['passes']} pass(es))"


def model_card_markdown(card: dict) -> str:
    a = card["audit"]
    hp = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in card["hyperparameters"].items()
    )
    val = card.get("val_acc")
    val_row = (
        "" if val is None else f"| validation accuracy | {val:.2%} ({card['data']['val_images']:,} held-out images) |\n"
    )
    return (
        f"# Model card: {card['study']} trial {card['trial']}\n\n"
        f"| | |\n|---|---|\n"
        f"| test accuracy | {test_accuracy(card)} |\n"
        f"{val_row}"
        f"| score ({card['rule']}) | {a['score']:.5f} = params {a['param_term']:.5f} + ops {a['ops_term']:.5f} |\n"
        f"| parameters | {a['raw_params']:,} ({a['nonzero_params']:,} nonzero) |\n"
        f"| operations | {a['raw_ops']:,} |\n"
        f"| trained on | {card['data']['source']}, {card['data']['train_images']:,} images |\n"
        f"| search | validation {card['search']['val_acc']:.2%}, score {card['search']['score']:.5f} |\n"
        f"| device, precision, time | {card['device']}, {card['precision']}, {card['seconds']:.0f} s |\n"
        f"| version | {card['version']} |\n"
        f"| command | `{card['command']}` |\n\n"
        f"## Hyperparameters\n\n| parameter | value |\n|---|---|\n{hp}\n\n"
        f"## Per-layer audit\n\n{score_table(a)}\n\n"
        f"`microsearch score model.pt --json` recomputes every number above from the model file.\n"
    )
