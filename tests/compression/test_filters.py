import pytest
import torch

from microsearch.checkpoint import load_model, save_model
from microsearch.compression import (
    QuantConfig,
    li_keep,
    li_prune,
    quantize_,
    remove_channels,
    sensitivity,
    thinet_prune,
    thinet_select,
)
from microsearch.evaluation import audit
from microsearch.models import create_model


def _model(**kw):
    return create_model("resnet", width=4, blocks=(1, 1, 1), **kw).eval()


def test_removing_zero_filters_keeps_logits_and_drops_the_expected_counts():
    model = _model()
    block = model.stages[0][0]  # 4 -> 4 -> 4 channels at 32x32
    with torch.no_grad():
        block.producer.weight[[1, 3]] = 0  # a fresh BatchNorm maps a zero channel to zero
    x = torch.randn(2, 3, 32, 32)
    smaller = remove_channels(model, {"stages.0.0": torch.tensor([0, 2])}).eval()
    assert smaller.config.mid_channels == (2, 8, 16)
    assert torch.allclose(smaller(x), model(x), atol=1e-5)
    before, after = audit(model), audit(smaller)
    # two filters: conv1 2*4*9 weights, BN 2*2, conv2 4*2*9 input weights
    assert before.params - after.params == 72 + 4 + 72
    hw = 32 * 32
    conv1 = 2 * hw * (36 + 35)
    bn = 2 * hw * 3
    conv2 = 4 * hw * 2 * (9 + 9)
    assert before.ops - after.ops == conv1 + bn + conv2
    assert after.score < before.score


def test_li_ranks_filters_by_l1_norm():
    model = _model()
    with torch.no_grad():
        model.stages[1][0].producer.weight[[0, 5]] *= 1e-3
    keep = li_keep(model, {"stages.1.0": 0.25})
    assert keep["stages.1.0"].tolist() == [1, 2, 3, 4, 6, 7]


def test_li_prunes_gradually_and_skips_sensitive_blocks():
    model = _model()
    tuned = []
    small = li_prune(model, 0.5, finetune=lambda m: tuned.append(m.config.mid_channels))
    assert small.config.mid_channels == (2, 4, 8)
    assert tuned == [(2, 8, 16), (2, 4, 16), (2, 4, 8)]  # retrained after each stage
    curve = {"stages.0.0": {0.5: 0.1}, "stages.1.0": {0.0: 0.9, 0.5: 0.5}, "stages.2.0": {0.5: 0.8}}
    careful = li_prune(model, 0.5, sensitive=curve, max_drop=0.1)
    assert careful.config.mid_channels == (2, 8, 8)


def test_sensitivity_prunes_each_block_alone():
    model = _model()
    result = sensitivity(model, lambda m: float(sum(m.config.mid_channels)), [0.0, 0.5])
    assert result == {
        "stages.0.0": {0.0: 28.0, 0.5: 26.0},
        "stages.1.0": {0.0: 28.0, 0.5: 24.0},
        "stages.2.0": {0.0: 28.0, 0.5: 20.0},
    }


def test_thinet_selection_and_least_squares():
    g = torch.Generator().manual_seed(0)
    v = 0.1 * torch.randn(500, 1, generator=g)
    contrib = torch.cat([v, torch.randn(500, 1, generator=g), v, torch.randn(500, 1, generator=g)], 1)
    kept, scales = thinet_select(contrib, 3)
    assert len(kept) == 3 and (0 in kept.tolist()) != (2 in kept.tolist())  # one duplicate goes
    rebuilt = contrib[:, kept] @ scales
    assert torch.allclose(rebuilt, contrib.sum(1), atol=1e-4)  # the copy left is scaled by 2
    assert sorted(scales.tolist())[-1] == pytest.approx(2.0, abs=1e-4)


def test_thinet_keeps_a_planted_informative_channel_and_drops_a_redundant_one():
    model = _model()
    block = model.stages[0][0]
    with torch.no_grad():
        block.consumer.weight[:, 2] = 0  # channel 2 contributes nothing to the next layer
        block.consumer.weight[:, 1] *= 10  # channel 1 dominates it
    old = block.producer.weight.clone()
    small = thinet_prune(model, {"stages.0.0": 0.5}, images=torch.randn(16, 3, 32, 32))
    new = small.stages[0][0].producer.weight
    assert new.shape[0] == 2
    kept = [i for i in range(4) if any(torch.equal(old[i], w) for w in new)]
    assert 1 in kept and 2 not in kept


def test_pruned_quantized_model_saves_and_rescores_exactly(tmp_path):
    model = _model()
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    model.train()(torch.randn(8, 3, 32, 32))  # calibrate
    small = li_prune(model.eval(), 0.5).eval()
    assert type(small.stages[0][0].producer).__name__ == "QuantConv2d"
    x = torch.randn(2, 3, 32, 32)
    save_model(tmp_path / "model.pt", small, {"passes": 1})
    loaded, _ = load_model(tmp_path / "model.pt")
    assert loaded.config.mid_channels == (2, 4, 8)
    assert torch.equal(loaded(x), small(x))
    assert audit(loaded).score == audit(small).score < audit(model).score


def test_separable_blocks_prune_too():
    model = _model(block="dwsep")
    small = li_prune(model, 0.5)
    assert small.config.mid_channels == (2, 4, 8)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert thinet_prune(model, 0.5, images=torch.randn(4, 3, 32, 32)).config.mid_channels == (2, 4, 8)


def test_bad_filter_ratios_are_named():
    with pytest.raises(ValueError, match="no prunable block named"):
        li_prune(_model(), {"stages.9.0": 0.5})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        li_prune(_model(), 1.5)
