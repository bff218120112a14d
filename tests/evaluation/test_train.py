import math

import pytest
import torch
from torch import nn

from microsearch.evaluation.train import (
    TrainConfig,
    TrainingDiverged,
    evaluate,
    lr_at,
    train,
)
from microsearch.models import create_model

CPU = torch.device("cpu")


def test_learning_rate_is_a_pure_function_of_the_step():
    c = TrainConfig(lr=0.4, warmup=0.25)
    lrs = [lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.4 / 25)
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 24
    assert lrs[-1] < 0.01 and lrs == sorted(lrs[:25]) + sorted(lrs[25:], reverse=True)
    cosine = TrainConfig(lr=0.4, warmup=0.0, schedule="cosine")
    assert lr_at(50, 101, cosine) == pytest.approx(0.2, rel=0.02)


def test_a_small_resnet_learns_the_synthetic_set(small_data):
    model = create_model("resnet", width=8, blocks=(1, 1, 1))
    seen = []
    history = train(model, small_data, TrainConfig(epochs=4, batch_size=64, lr=0.1), on_epoch=seen.append)
    assert [h.epoch for h in history] == [1, 2, 3, 4] and seen == history
    assert history[-1].val_acc > 0.35  # chance is 0.10
    assert history[-1].train_loss < history[0].train_loss
    assert evaluate(model, small_data.val, CPU).accuracy == pytest.approx(history[-1].val_acc)


def test_mixup_cutout_and_tta_train_and_count_passes(small_data):
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    config = TrainConfig(epochs=1, batch_size=64, mixup=0.4, cutout=8, tta=True)
    history = train(model, small_data, config)
    assert math.isfinite(history[0].train_loss)
    result = evaluate(model, small_data.val, CPU, tta=True)
    assert result.passes == 2 and result.images == len(small_data.val)


def test_the_callback_can_stop_training(small_data):
    class Stop(Exception):
        pass

    def stop_after_first(stats):
        raise Stop

    with pytest.raises(Stop):
        train(
            create_model("resnet", width=4, blocks=(1, 1, 1)),
            small_data,
            TrainConfig(epochs=3, batch_size=64),
            on_epoch=stop_after_first,
        )


class _NaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def test_nan_loss_stops_training_with_a_reason(small_data):
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 1"):
        train(_NaN(), small_data, TrainConfig(epochs=2, batch_size=64))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"schedule": "step"}, "schedule"),
        ({"lr": -1}, "lr"),
        ({"cutout": 40}, "cutout"),
    ],
)
def test_bad_train_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


def test_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainConfig(device="cuda")
