"""Accuracy and audited score of a trained model pruned at a series of ratios, one method at a time.

The methods: ``random`` and ``global`` (unstructured, ranked across all layers), ``layer`` (the same
ratio in every layer), ``han`` (prune + retrain in steps that share the fine-tuning epochs the
others get in one go), ``li`` (L1 filter pruning) and ``thinet`` (filters chosen by reconstruction
error). For unstructured methods the ratio is the fraction of conv/linear weights set to zero; for
``li`` and ``thinet`` it is the fraction of inner filters of every residual block that is removed.
Each pruned model can be saved as a model file that ``train --init`` continues from.
"""

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from microsearch.checkpoint import load_model
from microsearch.compression import (
    FILTER_PRUNERS,
    L1,
    FilterContext,
    RandomCriterion,
    check_ratio,
    filter_stages,
    han_prune_,
    make_permanent_,
    prune_global_,
    prune_layers_,
    sensitivity,
    snap_weights_,
    sparsity,
)
from microsearch.evaluation.data import Dataset
from microsearch.evaluation.loader import sample_images
from microsearch.evaluation.score import audit
from microsearch.evaluation.train import TrainConfig, evaluate, train


@dataclass
class SweepContext:
    """What a method may use besides the model: data, the retraining recipe, the device."""

    data: Dataset
    finetune: TrainConfig | None  # None: no retraining
    device: torch.device
    tta: bool
    precision: str = "auto"  # of evaluation (retraining uses the finetune config's)
    rule: str = "lab4"  # the score rule (the one the model file was scored with)
    sensitive: dict[str, dict[float, float]] | None = None  # Li et al.'s analysis, if run

    def retrain(self, model: nn.Module) -> None:
        if self.finetune:
            train(model, self.data, self.finetune)

    def shared_retrain(self, steps: int) -> Callable[[nn.Module], None] | None:
        """A retraining callback for a method that retrains ``steps`` times: the fine-tuning
        epochs are shared among the calls (the remainder goes to the last ones), so every method
        that retrains gets the same budget. None without fine-tuning."""
        if not self.finetune:
            return None
        total = self.finetune.epochs
        shares = iter([total // steps + (i >= steps - total % steps) for i in range(steps)])

        def retrain(model: nn.Module) -> None:
            epochs = next(shares, 0)
            if epochs:
                train(model, self.data, replace(self.finetune, epochs=epochs))

        return retrain


HAN_STEPS = 3
Method = Callable[[nn.Module, float, SweepContext], nn.Module]


def _unstructured(criterion) -> Method:
    def run(model: nn.Module, ratio: float, ctx: SweepContext) -> nn.Module:
        prune_global_(model, ratio, criterion())
        ctx.retrain(model)
        return model

    return run


def _layer(model: nn.Module, ratio: float, ctx: SweepContext) -> nn.Module:
    prune_layers_(model, ratio)
    ctx.retrain(model)
    return model


def _han(model: nn.Module, ratio: float, ctx: SweepContext) -> nn.Module:
    """Prune and retrain in HAN_STEPS steps that share the fine-tuning budget of the others."""
    han_prune_(model, ratio, ctx.shared_retrain(HAN_STEPS) or (lambda m: None), steps=HAN_STEPS)
    return model


def _filters(name: str) -> Method:
    """A filter pruner of the search's registry; its stage retrains share the fine-tuning budget."""

    def run(model: nn.Module, ratio: float, ctx: SweepContext) -> nn.Module:
        retrain = ctx.shared_retrain(len(filter_stages(model)))
        images = partial(sample_images, ctx.data.train, ctx.device)
        return FILTER_PRUNERS[name](model, ratio, FilterContext(images, retrain, ctx.sensitive))

    return run


METHODS: dict[str, Method] = {
    "random": _unstructured(RandomCriterion),
    "global": _unstructured(L1),
    "layer": _layer,
    "han": _han,
    **{name: _filters(name) for name in FILTER_PRUNERS},
}


def check_ratios(ratios: list[float]) -> None:
    if not ratios:
        raise ValueError("no ratios given")
    for r in ratios:
        check_ratio("the sweep", r)


def run_sweep(
    model_path: str | Path,
    method: str,
    ratios: list[float],
    ctx: SweepContext,
    log: Callable[[str], None] = print,
    save: Callable[[nn.Module, dict], str] | None = None,
) -> list[dict]:
    """One row per ratio: the method applied to a fresh copy of the saved model, then audited.
    ``save(model, row)``, if given, writes each pruned model and returns its path, which the row keeps."""
    if method not in METHODS:
        raise ValueError(f"unknown sweep method {method!r}; choose from {', '.join(METHODS)}")
    check_ratios(ratios)
    rows = []
    for ratio in ratios:
        start = time.perf_counter()
        model, _ = load_model(model_path, ctx.device)
        model = METHODS[method](model, ratio, ctx)
        make_permanent_(model)
        snap_weights_(model)  # a quantized model: what it runs on, weights that round to zero are zeros
        result = evaluate(model, ctx.data.val, ctx.device, ctx.tta, ctx.precision)
        score = audit(model, rule=ctx.rule, passes=result.passes)
        row = {
            "method": method,
            "rule": score.rule,
            "ratio": ratio,
            "val_acc": result.accuracy,
            "score": score.score,
            "param_term": score.param_term,
            "ops_term": score.ops_term,
            "params": score.params,
            "nonzero_params": score.nonzero_params,
            "ops": score.ops,
            "sparsity": sparsity(model),
            "finetune_epochs": ctx.finetune.epochs if ctx.finetune else 0,
            "seconds": time.perf_counter() - start,
        }
        if save is not None:
            row["model_file"] = save(model, row)
        log(
            f"{method} ratio {ratio:.2f}: val {row['val_acc']:.2%}  score {row['score']:.4f}  "
            f"sparsity {row['sparsity']:.1%}  params {row['params']:,}  ({row['seconds']:.0f}s)"
        )
        rows.append(row)
    return rows


def li_sensitivity(model_path: str | Path, ratios: list[float], ctx: SweepContext) -> dict:
    """Li et al.'s per-block sensitivity: validation accuracy with one block pruned, no retraining."""
    model, _ = load_model(model_path, ctx.device)
    return sensitivity(model, lambda m: evaluate(m, ctx.data.val, ctx.device, ctx.tta, ctx.precision).accuracy, ratios)


def check_merge(out: str | Path, rule: str) -> None:
    """Refuse (before a sweep runs) to add scores of ``rule`` to a folder whose rows another rule scored."""
    path = Path(out) / "sweep.json"
    rules = {r.get("rule", "lab4") for r in json.loads(path.read_text())} if path.exists() else set()
    if rules - {rule}:
        raise ValueError(f"{path} holds {sorted(rules)} scores, this sweep scores with {rule}: use another --out")


def save_rows(out: str | Path, rows: list[dict]) -> list[dict]:
    """Merge ``rows`` into ``out/sweep.json`` (replacing the same method's rows), write the CSV."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.json"
    old = json.loads(path.read_text()) if path.exists() else []
    methods = {r["method"] for r in rows}
    kept = [r for r in old if r["method"] not in methods]
    for rule in {r.get("rule", "lab4") for r in rows}:
        check_merge(out, rule)
    merged = kept + rows
    path.write_text(json.dumps(merged, indent=2) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in merged for k in r)))
        writer.writeheader()
        writer.writerows(merged)
    return merged


def finetune_config(meta: dict, epochs: int, lr: float, device: str, precision: str = "auto") -> TrainConfig | None:
    """The model's own training recipe (from its file), shortened for retraining after pruning."""
    if epochs <= 0:
        return None
    base = TrainConfig(**meta["train"]) if "train" in meta else TrainConfig()
    return replace(base, epochs=epochs, lr=lr, warmup=0.0, device=device, precision=precision)
