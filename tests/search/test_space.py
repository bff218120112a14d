import optuna
import pytest

from microsearch.compression import compute_layers
from microsearch.evaluation.data import load_data
from microsearch.models import create_model
from microsearch.search import StudyError, load_study, starting_points, suggest
from microsearch.search.objective import train_and_compress
from microsearch.search.space import MODEL


def _sample(study, seed=0):
    optuna_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = optuna_study.ask()
    return trial, suggest(trial, study)


@pytest.mark.parametrize("granularity", ["stage", "block"])
def test_conditional_parameters_follow_the_sampled_depth(tiny_study, granularity):
    study = load_study(tiny_study(), [f"space.granularity='{granularity}'", "space.depth=[1, 3]"])
    for seed in range(6):
        trial, plan = _sample(study, seed)
        depth = trial.params["depth"]
        unit_params = {k.rsplit("_", 1)[0] for k in trial.params if k.startswith("s")}
        if granularity == "stage":
            assert unit_params == {"s0", "s1"}
        else:
            assert unit_params == {f"s{s}b{b}" for s in range(2) for b in range(depth)}
        model = create_model(MODEL, **plan.model)
        middle = [n for n in compute_layers(model) if n.startswith("stages.")]
        assert set(plan.quant.layer_bits) == set(middle)  # every middle layer has sampled bits
        assert set(plan.sparsity) == set(middle)  # stem and classifier are never pruned
        assert set(plan.filters) == set(model.prunable_blocks())


def test_plan_values_come_from_the_trial(tiny_study):
    study = load_study(tiny_study(), ["space.granularity='block'"])
    trial, plan = _sample(study)
    assert plan.model["width"] == trial.params["width"]
    assert plan.quant.layer_bits["stages.1.0.conv2.0"] == (
        trial.params["s1b0_wbits"],
        trial.params["s1b0_abits"],
    )
    assert plan.filters["stages.1.0"] == trial.params["s1b0_filters"]
    assert plan.sparsity["stages.0.0.conv1.0"] == trial.params["s0b0_sparsity"]
    assert plan.quant.first_last_bits == 8 and plan.train.lr == trial.params["lr"]


def test_a_trial_trains_at_the_budgets_batch_size_or_else_its_recipes(tiny_study):
    assert _sample(load_study(tiny_study(), ["budget.recipe='fast'"]))[1].train.batch_size == 50  # the file's
    path = tiny_study()
    path.write_text(path.read_text().replace("batch_size = 50\n", "", 1))
    assert _sample(load_study(path))[1].train.batch_size == 256
    assert _sample(load_study(path, ["budget.recipe='fast'"]))[1].train.batch_size == 128
    with pytest.raises(StudyError, match=r"batch_size must be an integer >= 1 \(or absent: the recipe's\), got 'x'"):
        load_study(tiny_study(), ["budget.batch_size='x'"])


def test_a_stored_trial_rebuilds_exactly(tiny_study):
    study = load_study(tiny_study())
    trial, plan = _sample(study)
    again = suggest(optuna.trial.FixedTrial(trial.params), study)
    assert again.to_dict() == plan.to_dict()


def test_starting_point_is_inside_the_space(tiny_study):
    study = load_study(tiny_study())
    (point,) = starting_points(study)
    assert point["width"] == 4 and point["depth"] == 1  # ResNet-20's 16 and 3, clamped
    optuna_study = optuna.create_study()
    optuna_study.enqueue_trial(point)
    trial = optuna_study.ask()
    plan = suggest(trial, study)
    assert trial.params == point
    assert set(plan.quant.layer_bits.values()) == {(4, 4)}


def test_the_record_space_samples_stems_blocks_stage_widths_and_distillation(tiny_study):
    settings = [
        "space.stems=['conv', 'stride2', 's2d']",
        "space.blocks=['basic', 'mbconv']",
        "space.expansion=[2, 5]",
        "space.stage_scale=[0.5, 1.5]",
        "space.act_bits=[2, 4]",
        "distill.teacher='resnet'",
        "distill.weight=[0.5, 0.9]",
        "distill.temperature=[2.0, 6.0]",
    ]
    study = load_study(tiny_study(), settings)
    seen = set()
    for seed in range(12):
        trial, plan = _sample(study, seed)
        p = trial.params
        seen |= {p["stem"], p["block"]}
        assert plan.model["stem"] == p["stem"] and plan.model["block"] == p["block"]
        assert ("expansion" in p) == (p["block"] == "mbconv")
        assert plan.model["expansion"] == p.get("expansion", 1)
        width = p["width"]
        assert plan.model["multipliers"] == (1 * p["s0_scale"], 2 * p["s1_scale"])
        model = create_model(MODEL, **plan.model)
        assert model.stages[1][0].shortcut[0].out_channels == max(1, round(width * 2 * p["s1_scale"]))
        assert (plan.train.distill, plan.train.temperature) == (p["distill"], p["temperature"])
        assert 0.5 <= p["distill"] <= 0.9 and 2 <= p["temperature"] <= 6
        assert {plan.quant.layer_bits[n][1] for n in plan.quant.layer_bits} <= {2, 3, 4}
    assert seen == {"conv", "stride2", "s2d", "basic", "mbconv"}
    (point,) = starting_points(study)
    assert point["stem"] == "conv" and point["s0_scale"] == 1.0 and point["distill"] == 0.9


def test_without_a_teacher_trials_do_not_distil(tiny_study):
    trial, plan = _sample(load_study(tiny_study()))
    assert plan.train.distill == 0.0 and "distill" not in trial.params


@pytest.mark.parametrize("method", ["li", "thinet"])
def test_the_searchs_filter_pruners_remove_the_planned_filters(tiny_study, method):
    study = load_study(tiny_study(), [f"compression.structured='{method}'", "space.structured=[0.0, 0.5]"])
    point = {**starting_points(study)[0], "s0_filters": 0.5, "s1_filters": 0.25}
    plan = suggest(optuna.trial.FixedTrial(point), study)
    model = train_and_compress(plan, study, load_data(study.data))
    assert model.config.mid_channels == (2, 6)  # stage widths 4 and 8: half and a quarter removed
