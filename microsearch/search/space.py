"""The search space: turns an Optuna trial into plain configs for the lower layers.

Per-unit parameters (a unit is a stage, or a block, as the study chooses) exist only for the units
the sampled depth creates, so conditional parameters always match the architecture. The stem
convolution and the classifier keep ``first_last_bits`` and are never pruned.
"""

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution

from microsearch.compression import QuantConfig, compute_layers
from microsearch.evaluation.train import TrainConfig
from microsearch.models import create_model
from microsearch.search.study import StudyConfig, StudyError

MODEL = "resnet"


@dataclass
class TrialPlan:
    """Everything one trial builds, trains and compresses, in lower-layer configs."""

    model: dict[str, Any]  # create_model(MODEL, **model)
    train: TrainConfig
    quant: QuantConfig
    filters: dict[str, float]  # block name -> fraction of its inner filters removed
    sparsity: dict[str, float]  # layer name -> fraction of its weights zeroed

    def to_dict(self) -> dict[str, Any]:
        quant = asdict(self.quant)
        quant["layer_bits"] = {k: list(v) for k, v in self.quant.layer_bits.items()}
        model = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.items()}
        return {
            "model_name": MODEL,
            "model": model,
            "train": asdict(self.train),
            "quant": quant,
            "filters": self.filters,
            "sparsity": self.sparsity,
        }


def units(study: StudyConfig, depth: int) -> list[tuple[int, int | None]]:
    """(stage, block) per unit; block is None when a unit is a whole stage."""
    stages = range(len(study.space.multipliers))
    if study.space.granularity == "stage":
        return [(s, None) for s in stages]
    return [(s, b) for s in stages for b in range(depth)]


def unit_name(stage: int, block: int | None) -> str:
    return f"s{stage}" if block is None else f"s{stage}b{block}"


def _unit_of(layer: str, granularity: str) -> str | None:
    """``stages.1.2.conv1.0`` -> ``s1`` or ``s1b2``; None for the stem and the classifier."""
    parts = layer.split(".")
    if parts[0] != "stages":
        return None
    return unit_name(int(parts[1]), None if granularity == "stage" else int(parts[2]))


def _float(trial: optuna.trial.BaseTrial, name: str, bounds: tuple[float, float]) -> float:
    """A searched float where the bounds differ, else the fixed value (not a parameter)."""
    low, high = bounds
    return trial.suggest_float(name, low, high) if low < high else float(low)


def suggest(trial: optuna.trial.BaseTrial, study: StudyConfig) -> TrialPlan:
    """Sample one candidate. Works on a ``FixedTrial`` too, which rebuilds a stored trial."""
    space, budget, distill = study.space, study.budget, study.distill
    depth = trial.suggest_int("depth", *space.depth)
    width = trial.suggest_int("width", *space.width, log=True)
    scales = [_float(trial, f"s{s}_scale", space.stage_scale) for s in range(len(space.multipliers))]
    block_type = trial.suggest_categorical("block", list(space.blocks))
    model = {
        "width": width,
        "multipliers": tuple(m * f for m, f in zip(space.multipliers, scales)),
        "blocks": (depth,) * len(space.multipliers),
        "block": block_type,
        "stem": trial.suggest_categorical("stem", list(space.stems)) if len(space.stems) > 1 else space.stems[0],
        "expansion": trial.suggest_int("expansion", *space.expansion) if block_type == "mbconv" else 1,
    }
    train = TrainConfig(
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=trial.suggest_float("lr", *space.lr, log=True),
        weight_decay=trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", *space.label_smoothing),
        mixup=trial.suggest_float("mixup", *space.mixup),
        cutout=trial.suggest_int("cutout", *space.cutout),
        distill=_float(trial, "distill", distill.weight) if distill.enabled else 0.0,
        temperature=_float(trial, "temperature", distill.temperature) if distill.enabled else 4.0,
        teacher_tta=distill.tta,
        tta=budget.tta,
        recipe=budget.recipe,
        precision=study.precision,
        compile=study.compile,
        seed=study.seed,
        device=study.device,
    )
    bits, filters, sparsity = {}, {}, {}
    for stage, block in units(study, depth):
        u = unit_name(stage, block)
        bits[u] = (
            trial.suggest_int(f"{u}_wbits", *space.weight_bits),
            trial.suggest_int(f"{u}_abits", *space.act_bits),
        )
        if study.compression.structured != "none":
            ratio = trial.suggest_float(f"{u}_filters", *space.structured)
            names = [f"stages.{stage}.{b}" for b in ([block] if block is not None else range(depth))]
            filters.update(dict.fromkeys(names, ratio))
        if study.compression.unstructured != "none":
            sparsity[u] = trial.suggest_float(f"{u}_sparsity", *space.unstructured)
    layers = compute_layers(create_model(MODEL, **model))
    layer_units = {name: _unit_of(name, space.granularity) for name in layers}
    quant = QuantConfig(
        first_last_bits=space.first_last_bits,
        layer_bits={n: bits[u] for n, u in layer_units.items() if u is not None},
    )
    layer_sparsity = {n: sparsity[u] for n, u in layer_units.items() if u in sparsity}
    return TrialPlan(model, train, quant, filters, layer_sparsity)


def starting_points(study: StudyConfig) -> list[dict[str, Any]]:
    """Known-good first candidates so the sampler does not start blind: a ResNet-20 at 4 bits,
    unpruned, with the usual recipe (each value clamped into the study's bounds). A study file's
    ``[[enqueue]]`` tables add more; parameters they leave out are sampled."""
    space = study.space

    def clamp(value: float, bounds: tuple) -> float:
        return type(bounds[0])(min(max(value, bounds[0]), bounds[1]))

    depth = int(clamp(3, space.depth))
    block_type = "basic" if "basic" in space.blocks else space.blocks[0]
    point: dict[str, Any] = {
        "depth": depth,
        "width": int(clamp(16, space.width)),
        "block": block_type,
        "lr": clamp(0.2, space.lr),
        "weight_decay": clamp(5e-4, space.weight_decay),
        "label_smoothing": clamp(0.1, space.label_smoothing),
        "mixup": float(space.mixup[0]),
        "cutout": int(space.cutout[0]),
    }
    if len(space.stems) > 1:
        point["stem"] = "conv" if "conv" in space.stems else space.stems[0]
    if block_type == "mbconv":
        point["expansion"] = int(clamp(4, space.expansion))
    if space.stage_scale[0] < space.stage_scale[1]:
        point.update({f"s{s}_scale": clamp(1.0, space.stage_scale) for s in range(len(space.multipliers))})
    for name, bounds, usual in (
        ("distill", study.distill.weight, 0.9),
        ("temperature", study.distill.temperature, 4.0),
    ):
        if study.distill.enabled and bounds[0] < bounds[1]:
            point[name] = clamp(usual, bounds)
    for stage, block in units(study, depth):
        u = unit_name(stage, block)
        point[f"{u}_wbits"] = int(clamp(4, space.weight_bits))
        point[f"{u}_abits"] = int(clamp(4, space.act_bits))
        if study.compression.structured != "none":
            point[f"{u}_filters"] = float(space.structured[0])
        if study.compression.unstructured != "none":
            point[f"{u}_sparsity"] = float(space.unstructured[0])
    return [point]


def check_enqueue(study: StudyConfig) -> None:
    """Refuse ``[[enqueue]]`` points whose parameters the space does not have or whose values lie
    outside their ranges, naming the point and the key, before anything is written to a storage."""
    base = starting_points(study)[0]
    for number, point in enumerate(study.enqueue, start=1):
        where = f"{study.path}: [[enqueue]] point {number}"
        trial = optuna.trial.FixedTrial({**base, **point})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # out-of-range values: reported below
            try:
                suggest(trial, study)
            except ValueError as e:  # a value of the wrong kind, or a configuration that cannot be built
                raise StudyError(f"{where}: {e}") from None
        for key, value in point.items():
            d = trial.distributions.get(key)
            if d is None:
                raise StudyError(f"{where}: {key!r} is not a parameter of this space (or of this architecture)")
            inside = value in d.choices if isinstance(d, CategoricalDistribution) else d.low <= value <= d.high
            if not inside:
                allowed = list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
                raise StudyError(f"{where}: {key} = {value!r} is outside the space ({allowed})")
