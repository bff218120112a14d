"""Retrain trials into a final model, with the study's retrain budget ([retrain]).

Two ways: one trial on every training image, tested once (``retrain``); or the K lowest-score trials
that met the trial target, each retrained with the validation images held out, the final model
chosen on those, and only that one tested once (``retrain_top``, which the campaign runs).
"""

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.trial import FixedTrial, TrialState
from torch import nn

from microsearch import code_version
from microsearch.checkpoint import load_model, save_model
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
from microsearch.evaluation.views import counts, params_markdown, score_markdown, score_terms
from microsearch.search.objective import init_name, start_from, train_and_compress
from microsearch.search.pruner import is_feasible
from microsearch.search.run import best_feasible, load_existing
from microsearch.search.space import MODEL, suggest
from microsearch.search.study import StudyConfig, StudyError
from microsearch.search.teacher import ensure_teacher, start_model, teacher_record


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
    trial = pick_trial(load_existing(study, storage_url), which)
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
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    r = study.retrain
    budget = {
        "epochs": epochs or r.epochs or plan.train.epochs,
        "finetune_epochs": r.finetune_epochs or study.budget.finetune_epochs,
        "recipe": r.recipe or plan.train.recipe,
        "lr": r.lr or plan.train.lr,
    }
    plan = replace(plan, train=replace(plan.train, epochs=budget["epochs"], recipe=budget["recipe"], lr=budget["lr"]))
    d = study.distill
    teacher = ensure_teacher(study, None, log) if plan.train.distill or (d.init and not d.init_file) else None
    init = start_from(plan, study, start_model(study, None if teacher is None else teacher[0], log))
    device = resolve_device(plan.train.device)
    total = plan.train.epochs + budget["finetune_epochs"]

    def progress(offset: int) -> Callable[[EpochStats], None]:
        def show(s: EpochStats) -> None:
            done = s.epoch + offset
            log(
                f"[retrain trial {trial.number}] epoch {done}/{total}  loss {s.train_loss:.3f}  "
                f"train {s.train_acc:.1%}  val {s.val_acc:.1%}  {s.seconds:.0f}s"
            )

        return show

    log(f"training trial {trial.number} on {len(data.train)} images for {total} epochs")
    model = train_and_compress(
        plan,
        study,
        data,
        progress(0),
        progress(plan.train.epochs),
        checkpoints,
        None if teacher is None else teacher[0],
        budget["finetune_epochs"],
        init,
    )
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
        "budget": budget,
        "teacher": None if teacher is None else teacher_record(study, teacher[1]),
        "init": init_name(study, init),  # the float weights it started from
        "init_file": study.distill.init_file if init is not None else "",
        "target": study.target,
        "trial_target": study.trial_target,
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


def pick_candidates(optuna_study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` lowest-score trials that met the trial target; with none, the most accurate."""
    complete = [t for t in optuna_study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    feasible = sorted((t for t in complete if is_feasible(t)), key=lambda t: t.value)
    if feasible:
        return feasible[:top]
    return sorted(complete, key=lambda t: -t.user_attrs["val_acc"])[:top]


def candidate_stage(
    study: StudyConfig,
    trials: list[optuna.trial.FrozenTrial],
    out: Path,
    epochs: int | None,
    log: Callable[[str], None],
) -> list[dict]:
    """Retrain each candidate into ``out/candidates/trial-N`` with the validation images held out
    (resumable from its checkpoints); their cards, test accuracy unmeasured."""
    data = load_data(study.data)
    cards = []
    for trial in trials:
        folder = out / "candidates" / f"trial-{trial.number}"
        card_file = folder / "model_card.json"
        if not card_file.is_file():
            checkpoints = folder / "checkpoints"
            if checkpoints.is_dir():
                log(f"[retrain] candidate trial {trial.number}: resuming from its checkpoints")
            model, card = train_trial(study, trial, data, folder, epochs, log, checkpoints)
            write_model(folder, model, card)
            shutil.rmtree(checkpoints)
        cards.append(json.loads(card_file.read_text()))
    return cards


def choose(cards: list[dict], target: float) -> dict:
    """The lowest-score candidate at or above the target on validation; else the most accurate."""
    reaching = [c for c in cards if c["val_acc"] is not None and c["val_acc"] >= target]
    if reaching:
        return min(reaching, key=lambda c: c["audit"]["score"])
    return max(cards, key=lambda c: c["val_acc"] or 0.0)


def final_stage(study: StudyConfig, chosen: dict, out: Path, final: Path) -> dict:
    """Copy the chosen candidate to ``final`` and test it once (where the source has a test split);
    the test split is read here and nowhere else."""
    card_file = final / "model_card.json"
    if card_file.is_file():  # a resumed run: done already, unless a resumed search changed the choice
        done = json.loads(card_file.read_text())
        if done["trial"] == chosen["trial"]:
            return done
    source = out / "candidates" / f"trial-{chosen['trial']}"
    model, _ = load_model(source / "model.pt")
    card = {**chosen, "test_command": chosen["test_command"].replace(str(source), str(final))}
    test_once(model, card, load_data(study.data))
    final.mkdir(parents=True, exist_ok=True)
    write_model(final, model, card)
    return card


def retrain_top(
    study: StudyConfig,
    optuna_study: optuna.Study,
    out: str | Path,
    top: int | None = None,
    epochs: int | None = None,
    final: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Retrain the ``top`` (default ``[retrain] top``) lowest-score trials that met the trial
    target, choose the final model on the validation images against ``target``, test it once and
    write it to ``final`` (default ``out``). Resumable: finished candidates are not retrained."""
    top = top or study.retrain.top
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    out = Path(out)
    candidates = pick_candidates(optuna_study, top)
    if not candidates:
        raise StudyError(f"study {study.name!r} has no completed trial to retrain yet")
    log(f"[retrain] candidates: trials {', '.join(str(t.number) for t in candidates)}")
    cards = candidate_stage(study, candidates, out, epochs, log)
    chosen = choose(cards, study.target)
    log(f"[retrain] chosen: trial {chosen['trial']} (validation {chosen['val_acc']:.2%}, target {study.target:.0%})")
    return final_stage(study, chosen, out, Path(final) if final is not None else out)


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


def training_words(card: dict) -> str:
    """How the final model was trained: budget, recipe, teacher, starting weights."""
    budget, teacher = card["budget"], card["teacher"]
    return (
        f"{budget['epochs']} epochs + {budget['finetune_epochs']} fine-tuning epochs after compression "
        f"(recipe {budget['recipe']}, peak learning rate {budget['lr']:g})"
        + (f", distilled from {teacher['model']} ({teacher['val_acc']:.2%} validation)" if teacher else "")
        + (" over each image and its mirror" if teacher and teacher.get("tta") else "")
        + (", started from the teacher's float weights" if card.get("init") == "teacher" else "")
        + (f", started from the float weights of {card.get('init_file')}" if card.get("init") == "init_file" else "")
    )


def model_card_markdown(card: dict) -> str:
    a = card["audit"]
    val = card.get("val_acc")
    val_row = (
        "" if val is None else f"| validation accuracy | {val:.2%} ({card['data']['val_images']:,} held-out images) |\n"
    )
    return (
        f"# Model card: {card['study']} trial {card['trial']}\n\n"
        f"| | |\n|---|---|\n"
        f"| test accuracy | {test_accuracy(card)} |\n"
        f"{val_row}"
        f"| score ({card['rule']}) | {score_terms(a)} |\n"
        f"| counted | {counts(a)} |\n"
        f"| trained on | {card['data']['source']}, {card['data']['train_images']:,} images |\n"
        f"| training | {training_words(card)} |\n"
        f"| search | validation {card['search']['val_acc']:.2%}, score {card['search']['score']:.5f} |\n"
        f"| device, precision, time | {card['device']}, {card['precision']}, {card['seconds']:.0f} s |\n"
        f"| version | {card['version']} |\n"
        f"| command | `{card['command']}` |\n\n"
        f"## Hyperparameters\n\n{params_markdown(card['hyperparameters'])}\n\n"
        f"## Per-layer audit\n\n{score_markdown(a)}\n\n"
        f"`microsearch score model.pt --json` recomputes every number above from the model file.\n"
    )
