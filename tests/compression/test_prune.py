import pytest
import torch
from torch.nn.utils import prune

from microsearch.compression import (
    RandomCriterion,
    han_prune_,
    make_permanent_,
    prunable_layers,
    prune_global_,
    prune_layers_,
    sparsity,
)
from microsearch.evaluation import audit
from microsearch.models import create_model


def _model():
    return create_model("resnet", width=4, blocks=(1, 1, 1))


def _total(model):
    return sum(m.weight.numel() for m in prunable_layers(model).values())


def _zeros(model):
    return sum(int((m.weight == 0).sum()) for m in prunable_layers(model).values())


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_global_ratio_is_met_to_within_one_weight(ratio):
    model = _model()
    prune_global_(model, ratio)
    assert abs(_zeros(model) - ratio * _total(model)) <= 1


def test_global_l1_ranks_across_layers_and_prunes_the_smallest():
    model = _model()
    prune_global_(model, 0.5)
    per_layer = {n: float((m.weight == 0).float().mean()) for n, m in prunable_layers(model).items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.2  # not uniform: ranked globally
    kept = torch.cat([m.weight[m.weight != 0].abs() for m in prunable_layers(model).values()])
    removed = torch.cat([m.weight_orig[m.weight_mask == 0].abs() for m in prunable_layers(model).values()])
    assert removed.max() <= kept.min()


def test_masks_appear_and_remove_keeps_the_zeros():
    model = _model()
    prune_global_(model, 0.6)
    for m in prunable_layers(model).values():
        assert hasattr(m, "weight_orig") and hasattr(m, "weight_mask")
    zeros = _zeros(model)
    make_permanent_(model)
    for m in prunable_layers(model).values():
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        assert isinstance(m.weight, torch.nn.Parameter) and not prune.is_pruned(m)
    assert _zeros(model) == zeros


def test_ratios_are_cumulative_and_keep_earlier_zeros():
    model = _model()
    prune_global_(model, 0.3)
    first = {n: (m.weight == 0).clone() for n, m in prunable_layers(model).items()}
    prune_global_(model, 0.6)
    assert abs(_zeros(model) - 0.6 * _total(model)) <= 1
    for n, m in prunable_layers(model).items():
        assert bool((m.weight[first[n]] == 0).all())
        assert int((m.weight_mask == 0).sum()) == int((m.weight == 0).sum())  # one mask, not stacked


def test_layer_wise_ratios_and_errors():
    model = _model()
    prune_layers_(model, 0.25)
    for m in prunable_layers(model).values():
        assert int((m.weight == 0).sum()) == round(0.25 * m.weight.numel())
    prune_layers_(model, {"fc": 0.5})
    assert int((model.fc.weight == 0).sum()) == round(0.5 * model.fc.weight.numel())
    with pytest.raises(ValueError, match="no prunable layer named"):
        prune_layers_(model, {"head": 0.5})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.0"):
        prune_global_(model, 1.0)


def test_random_pruning_removes_large_weights_too():
    model = _model()
    prune_global_(model, 0.5, RandomCriterion(seed=0))
    removed = torch.cat([m.weight_orig[m.weight_mask == 0].abs() for m in prunable_layers(model).values()])
    kept = torch.cat([m.weight[m.weight != 0].abs() for m in prunable_layers(model).values()])
    assert removed.max() > kept.median()
    assert abs(_zeros(model) - 0.5 * _total(model)) <= 1


def test_han_iterates_prune_and_retrain_with_masks_fixed():
    model = _model()
    calls = []

    def finetune(m):  # a few SGD steps: masked weights must stay zero
        calls.append(sparsity(m))
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            m(torch.randn(4, 3, 32, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    schedule = han_prune_(model, 0.75, finetune, steps=3)
    assert schedule == pytest.approx([0.25, 0.5, 0.75])
    assert calls == pytest.approx(schedule, abs=1e-3)
    assert sparsity(model) == pytest.approx(0.75, abs=1e-3)


def test_score_falls_as_sparsity_rises():
    terms = []
    for ratio in (0.0, 0.3, 0.6, 0.9):
        model = _model()
        prune_global_(model, ratio)
        make_permanent_(model)
        terms.append(audit(model).param_term)
    assert terms == sorted(terms, reverse=True) and len(set(terms)) == 4
    weights = _total(_model())
    assert terms[0] - terms[3] == pytest.approx(round(0.9 * weights) / 5.6e6)
