"""The methodology of a study in words and tables: the dashboard note and the report share it."""

from microsearch.evaluation.train import RECIPES, TrainConfig
from microsearch.search.study import StudyConfig


def recipe_text(name: str) -> str:
    """What a training recipe adds to the plain loop, in words, from its definition."""
    r, base = RECIPES[name], RECIPES["baseline"]
    parts = []
    if r.ema_halflife:
        parts.append(f"an EMA of the weights (half-life {r.ema_halflife} epochs, validated and kept)")
    if r.pad_mode == "reflect":
        parts.append("reflect-padded translation")
    if r.alternate_flip:
        parts.append("alternating flip")
    if r.float_warmup:
        parts.append(f"the first {r.float_warmup:.0%} of the epochs in float, then quantizers from the trained weights")
    if r.batch_size != base.batch_size:
        parts.append(f"batch {r.batch_size} unless the budget sets one")
    return f"recipe {name}" + (": " + ", ".join(parts) if parts else " (nothing more)") + "."


def goal(study: StudyConfig) -> str:
    d, r = study.data, study.retrain
    trial_goal = (
        f"A trial is feasible when it reaches {study.trial_target:.0%} validation accuracy at its short "
        f"budget ({study.budget.epochs} epochs); the {r.top} lowest-score feasible trials are retrained "
        f"for {r.epochs or study.budget.epochs} epochs and the final model must reach {study.target:.0%}."
        if study.trial_target != study.target
        else f"Trials and the final model share the target ({study.target:.0%})."
    )
    return (
        f"Minimise the audited compression score (rule {study.rule}) subject to validation accuracy on "
        f"{d.source}, with {d.val_size:,} training images held out for validation (seed {d.seed}). "
        f"{trial_goal} The final model is chosen on the validation images; the test split is used only by "
        f"the one evaluation of that model."
    )


def distillation(study: StudyConfig) -> str:
    """Whether and how trials and the retrain distil from a teacher, in words."""
    d = study.distill
    start = f"the saved float model {d.init_file}" if d.init_file else "the teacher"
    init = (
        f" Candidates whose float network has exactly the layers of {start} start from its trained "
        "weights and train quantized from the first epoch (no float warm-up)."
        if d.init
        else ""
    )
    if not d.enabled:
        return "No distillation." + init
    args = ", ".join(f"{k}={v}" for k, v in d.teacher_args.items())
    if d.teacher:
        teacher = (
            f"a float {d.teacher}{f' ({args})' if args else ''} trained once for {d.teacher_epochs} epochs "
            f"(recipe {d.teacher_recipe}) on the same training images and cached"
        )
    elif d.teacher_files:
        teacher = (
            f"the mean logits of the saved models {', '.join(d.teacher_files)} (an ensemble), "
            "each trained on the same training images"
        )
    else:
        teacher = f"the saved model {d.teacher_file}, trained on the same training images"
    return (
        f"Trials and the retrain distil from {teacher}; "
        f"loss = (1 - w) x cross-entropy + w x T^2 x KL(teacher || student) at temperature T "
        f"(w in {list(d.weight)}, T in {list(d.temperature)}). The teacher is not part of the scored model."
        + (" Its soft labels are its mean logits on each image and its mirror." if d.tta else "")
        + init
    )


def space_rows(study: StudyConfig) -> list[tuple[str, str]]:
    sp, c = study.space, study.compression
    unit = "stage" if sp.granularity == "stage" else "residual block"

    def fmt(v) -> str:
        return str(list(v)) if isinstance(v, tuple) else str(v)

    rows = [
        ("width: first-stage channels (log scale)", sp.width),
        ("blocks per stage", sp.depth),
        ("stage channel multipliers", sp.multipliers),
        ("per-stage factor on the multipliers", sp.stage_scale),
        ("stem", sp.stems),
        ("block type", sp.blocks),
        ("mbconv expansion", sp.expansion),
        (f"filters removed per {unit} ({c.structured})", sp.structured),
        (f"weights zeroed per {unit} (layer-wise L1, {c.unstructured})", sp.unstructured),
        (f"weight bits per {unit}", sp.weight_bits),
        (f"activation bits per {unit}", sp.act_bits),
        ("first and last layer bits (fixed)", sp.first_last_bits),
        ("peak learning rate (log scale)", sp.lr),
        ("weight decay (log scale)", sp.weight_decay),
        ("cutout square side, px", sp.cutout),
        ("mixup alpha", sp.mixup),
        ("label smoothing", sp.label_smoothing),
    ]
    return [(name, fmt(value)) for name, value in rows]


def recipe(study: StudyConfig) -> str:
    b, c, p = study.budget, study.compression, study.pruner
    batch = TrainConfig(batch_size=b.batch_size, recipe=b.recipe).batch_size  # the budget's, or the recipe's
    return (
        f"Each trial builds a CIFAR ResNet with quantization-aware layers (LSQ step sizes, straight-through "
        f"estimator; biases and BatchNorm at 16 bits) and trains it for {b.epochs} epochs: SGD with Nesterov "
        f"momentum, one-cycle learning rate, batch {batch}, random crop (padding 4) and horizontal flip, "
        f"plus the sampled cutout, mixup and label smoothing; {recipe_text(b.recipe)} Training runs at the "
        f"{study.precision} precision (auto: bf16 where the hardware runs it natively; quantized layers are "
        f"exact in either). It then removes filters ({c.structured}), zeroes "
        f"the smallest weights per layer ({c.unstructured}), fine-tunes {b.finetune_epochs} epochs at learning "
        f"rate {b.finetune_lr} with the masks fixed, and is audited layer by layer. Trials record validation "
        f"accuracy every epoch; a target-aware pruner stops a trial whose accuracy falls more than {p.margin} "
        f"below every feasible learning curve scaled to the target (after {p.warmup_epochs} warm-up epochs). "
        f"TPE (multivariate, grouped, constant liar) samples the space; a ResNet-20 at 4 bits and the "
        f"study's {len(study.enqueue)} [[enqueue]] starting points run first."
    )


def markdown(study: StudyConfig) -> str:
    table = "\n".join(f"| {name} | {value} |" for name, value in space_rows(study))
    return (
        f"## Study {study.name}\n\n{goal(study)} {distillation(study)}\n\n"
        f"| parameter | range |\n|---|---|\n{table}\n\n{recipe(study)}\n"
    )
