import math
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from microsearch.compression import QuantConfig, calibrated, quantize_
from microsearch.evaluation import train as train_module
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.loader import DeviceLoader
from microsearch.evaluation.train import (
    Progress,
    TrainConfig,
    TrainingDiverged,
    device_name,
    distillation_loss,
    evaluate,
    lr_at,
    mixup_loss,
    print_progress,
    resolve_precision,
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


def test_mixup_loss_mixes_the_labels_as_the_images_were_mixed():
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4) and (1/2, 1/2)
    labels, swap = torch.tensor([0, 1]), torch.tensor([1, 0])
    own = -(math.log(0.75) + math.log(0.5)) / 2
    partner = -(math.log(0.25) + math.log(0.5)) / 2
    assert mixup_loss(logits, labels, None, 0.3, 0.0).item() == pytest.approx(own, rel=1e-6)
    assert mixup_loss(logits, labels, swap, 0.3, 0.0).item() == pytest.approx(0.3 * own + 0.7 * partner, rel=1e-6)


def test_mixup_and_cutout_change_training_and_tta_counts_passes(small_data):
    def first_epoch_loss(**augment) -> float:
        torch.manual_seed(0)
        model = create_model("resnet", width=4, blocks=(1, 1, 1))
        return train(model, small_data, TrainConfig(epochs=1, batch_size=64, **augment))[0].train_loss, model

    plain, _ = first_epoch_loss()
    assert first_epoch_loss()[0] == pytest.approx(plain, rel=1e-6)  # the same seed, the same run
    assert abs(first_epoch_loss(mixup=0.4)[0] - plain) > 1e-4  # other inputs, other targets
    loss, model = first_epoch_loss(cutout=8)
    assert abs(loss - plain) > 1e-4
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
        ({"recipe": "slow"}, "recipe"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_train_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


def test_a_recipe_sets_the_batch_size_unless_the_config_names_one():
    assert (TrainConfig().batch_size, TrainConfig(recipe="fast").batch_size) == (256, 128)
    assert TrainConfig(recipe="fast", batch_size=512).batch_size == 512


def test_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainConfig(device="cuda")


def _quantized(width: int = 8) -> nn.Module:
    model = create_model("resnet", width=width, blocks=(1, 1, 1))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    return model


def test_auto_precision_is_bf16_exactly_where_the_cpu_runs_it_natively(monkeypatch):
    assert resolve_precision("fp32", CPU) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", CPU) == torch.bfloat16
    assert "with bf16" in device_name(CPU)  # results say which CPU units they ran on
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", CPU) == torch.float32
    assert torch.backends.cpu.get_cpu_capability() in device_name(CPU)
    assert "bf16" not in device_name(CPU)
    with pytest.warns(UserWarning, match="no native bf16: it is emulated"):
        assert resolve_precision("bf16", CPU) == torch.bfloat16  # asked for: obeyed, with a warning
    with pytest.raises(ValueError, match=r"TrainConfig\.precision"):
        TrainConfig(precision="fp8")


@pytest.mark.filterwarnings("ignore:.*no native bf16")  # where the CPU emulates bf16
def test_a_quantized_model_scores_the_same_accuracy_in_bf16_and_fp32(small_data):
    model = _quantized()
    train(model, small_data, TrainConfig(epochs=4, batch_size=64, lr=0.1, precision="bf16"))
    held_out = load_data(DataConfig("synthetic:6000", val_size=5000, seed=3)).val
    bf16 = evaluate(model, held_out, CPU, precision="bf16").accuracy
    fp32 = evaluate(model, held_out, CPU, precision="fp32").accuracy
    assert bf16 > 0.3  # it learned something, so the comparison means something
    assert abs(bf16 - fp32) <= 1 / 5000  # quantized layers evaluate exactly in both


def test_compiled_and_eager_training_learn_alike(small_data):
    from torch._dynamo.utils import counters

    counters.clear()
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        config = TrainConfig(epochs=2, batch_size=64, lr=0.1, precision="fp32", compile=mode)
        history = train(_quantized(4), small_data, config)
        results[mode] = history
    assert results["on"][0].compile_seconds > 0 and results["off"][0].compile_seconds == 0
    assert results["on"][-1].train_loss == pytest.approx(results["off"][-1].train_loss, rel=0.05)
    # One graph per phase: a graph break (a host read such as ``bool(tensor)`` in a quantizer)
    # splits the step into a graph per layer, which recompiles per layer until Dynamo gives up
    # and runs the rest eagerly, at half the speed. The fast recipe's float warm-up switches once.
    train(_quantized(4), small_data, TrainConfig(epochs=4, batch_size=64, recipe="fast", compile="on"))
    assert dict(counters["graph_break"]) == {}


def test_auto_compiles_quantized_models_on_short_runs_and_float_models_on_long_ones(small_data, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    steps = len(small_data.train) // 400  # one epoch at batch 400
    config = TrainConfig(epochs=1, batch_size=400, lr=0.1, precision="fp32")

    def compiles(model: nn.Module, quantized_min: int, float_min: int, mode: str = "auto") -> bool:
        monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS", quantized_min)
        monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS_FLOAT", float_min)
        compiled.clear()
        train(model, small_data, replace(config, compile=mode))
        return bool(compiled)

    def float_model() -> nn.Module:
        return create_model("resnet", width=8, blocks=(1, 1, 1))

    assert compiles(_quantized(), steps, steps + 1) and not compiles(float_model(), steps, steps + 1)
    assert not compiles(_quantized(), steps + 1, steps) and compiles(float_model(), steps + 1, steps)
    assert not compiles(_quantized(), steps, steps, mode="off") and compiles(float_model(), 10**6, 10**6, mode="on")
    # a teacher by the same rule: compiled where it is quantized and the run long enough
    monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS", steps)
    monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS_FLOAT", steps + 1)
    for teacher, student, expected in (
        (_quantized(), float_model(), "teacher"),
        (float_model(), float_model(), ""),
        (_quantized(), _quantized(), "teacher student"),
    ):
        compiled.clear()
        train(student, small_data, replace(config, distill=0.5), teacher=teacher)
        assert " ".join("teacher" if m is teacher else "student" for m in compiled) == expected


def test_compile_falls_back_to_eager_with_one_warning(small_data, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        history = train(_quantized(4), small_data, TrainConfig(epochs=1, batch_size=64, compile="on"))
    assert len(history) == 1 and history[0].compile_seconds == 0  # trained, eagerly


def test_progress_is_reported_inside_an_epoch(small_data, monkeypatch):
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)
    seen = []
    train(
        create_model("resnet", width=4, blocks=(1, 1, 1)),
        small_data,
        TrainConfig(epochs=2, batch_size=64),
        on_progress=seen.append,
    )
    steps = len(small_data.train) // 64
    assert len(seen) == 2 * steps
    assert [p.images for p in seen[:3]] == [64, 128, 192] and seen[0].epoch_images == steps * 64
    assert seen[-1].seconds_left == 0 and all(p.images_per_second > 0 for p in seen)


def test_the_fast_recipe_warms_up_in_float_then_trains_quantized(small_data, monkeypatch):
    phases = []
    original = train_module.set_quantization_
    monkeypatch.setattr(train_module, "set_quantization_", lambda m, on: phases.append(on) or original(m, on))
    model = _quantized(4)
    train(model, small_data, TrainConfig(epochs=4, batch_size=64, recipe="fast"))
    assert phases == [False, True]  # 30% of 4 epochs: one float epoch, then quantized
    assert calibrated(model)  # the quantizers started from the trained weights
    phases.clear()
    train(model, small_data, TrainConfig(epochs=2, batch_size=64, recipe="fast"))
    assert phases == [True]  # fine-tuning a calibrated model never goes back to float
    phases.clear()
    train(_quantized(4), small_data, TrainConfig(epochs=4, batch_size=64, recipe="fast", float_warmup=False))
    assert phases == [True]  # from trained float weights: quantized from the first epoch


def test_ema_weights_are_a_smoothed_copy_that_ends_in_the_model():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = train_module._EMA(model, halflife_steps=1.0)  # decay 0.5 per step
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(100, 103):
        ema.update(step)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 2), 1 - 0.5**3))


class _StopAfter(Exception):
    pass


@pytest.mark.parametrize("recipe", ["baseline", "fast"])
def test_a_checkpointed_run_resumes_where_it_stopped_and_ends_identically(small_data, tmp_path, recipe):
    config = TrainConfig(epochs=4, batch_size=64, lr=0.1, recipe=recipe, precision="fp32")
    torch.manual_seed(0)
    whole = _quantized(4)
    reference = train(whole, small_data, config)

    def stop_at_3(stats):
        if stats.epoch == 3:
            raise _StopAfter

    torch.manual_seed(0)
    interrupted = _quantized(4)
    with pytest.raises(_StopAfter):
        train(interrupted, small_data, config, on_epoch=stop_at_3, checkpoint=tmp_path / "run.pt")
    torch.manual_seed(0)
    resumed = _quantized(4)  # a new process: a fresh model, the checkpoint file
    seen = []
    history = train(resumed, small_data, config, on_epoch=seen.append, checkpoint=tmp_path / "run.pt")
    assert [s.epoch for s in seen] == [4]  # epochs 1-3 were not trained again
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    assert history[-1].val_acc == pytest.approx(reference[-1].val_acc, abs=0.01)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=name)
    again = train(_quantized(4), small_data, config, checkpoint=tmp_path / "run.pt")
    assert len(again) == 4  # a finished run is not trained again


def test_the_fast_recipe_fine_tunes_a_pruned_model(small_data):
    from microsearch.compression import make_permanent_, prune_layers_, sparsity

    model = _quantized(4)
    train(model, small_data, TrainConfig(epochs=1, batch_size=64))
    prune_layers_(model, 0.5)  # masks on: every weight is weight_orig * weight_mask
    before = model.fc.weight_orig.detach().clone()
    history = train(model, small_data, TrainConfig(epochs=2, batch_size=64, recipe="fast"))
    assert len(history) == 2 and not torch.equal(model.fc.weight_orig, before)  # it trained
    make_permanent_(model)
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)  # the EMA brought no pruned weight back
    make_permanent_(model)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Conv2d))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert zeros / total == pytest.approx(0.5, abs=0.01)  # the EMA weights kept the pruned zeros


def test_distillation_loss_is_the_temperature_scaled_kl_divergence():
    t = 2.0
    teacher = torch.tensor([[2 * math.log(3), 0.0]])  # softened: p = (3/4, 1/4)
    student = torch.zeros(1, 2)  # softened: q = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation_loss(student, teacher, t).item() == pytest.approx(kl * t * t, rel=1e-6)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)
    batch = torch.randn(8, 10)
    assert distillation_loss(batch, batch.roll(1, 0), 4.0) > 0


def _always_class_0() -> nn.Module:
    teacher = create_model("resnet", width=2, blocks=(1, 1, 1))
    with torch.no_grad():
        teacher.fc.weight.zero_()
        teacher.fc.bias.copy_(torch.tensor([8.0] + [0.0] * 9))
    return teacher


def test_a_student_distilled_alone_follows_its_teacher_not_the_labels(small_data):
    teacher = _always_class_0()
    before = [p.clone() for p in teacher.parameters()]
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1, distill=1.0, temperature=1.0)
    torch.manual_seed(0)
    student = create_model("resnet", width=8, blocks=(1, 1, 1))
    train(student, small_data, config, teacher=teacher)
    x = next(iter(DeviceLoader(small_data.val, 400, CPU)))[0]
    assert (student.eval()(x).argmax(1) == 0).float().mean() > 0.95  # what the teacher says
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # teacher untouched
    torch.manual_seed(0)
    plain = create_model("resnet", width=8, blocks=(1, 1, 1))
    history = train(plain, small_data, TrainConfig(epochs=2, batch_size=64, lr=0.1))
    assert history[-1].val_acc > 0.15  # the same run on the labels learns the classes (chance: 0.10)
    assert (plain.eval()(x).argmax(1) == 0).float().mean() < 0.5


class _Recording(nn.Module):
    """A teacher that keeps every batch it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _always_class_0()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("teacher_tta", [False, True])
def test_the_teacher_sees_each_batch_and_with_teacher_tta_its_mirror(small_data, teacher_tta, monkeypatch):
    monkeypatch.setattr(train_module, "INFERENCE_BATCH", {"cpu": 150})  # each batch of 400 in 3 parts
    teacher = _Recording()
    config = TrainConfig(epochs=1, batch_size=400, lr=0.1, distill=0.5, teacher_tta=teacher_tta, compile="off")
    train(create_model("resnet", width=2, blocks=(1, 1, 1)), small_data, config, teacher=teacher)
    steps = len(small_data.train) // 400
    assert [len(x) for x in teacher.seen] == [150, 150, 100] * (2 if teacher_tta else 1) * steps
    teacher.seen = [torch.cat(teacher.seen[i : i + 3]) for i in range(0, len(teacher.seen), 3)]
    if not teacher_tta:
        assert len(teacher.seen) == steps
        return
    assert len(teacher.seen) == 2 * steps
    assert all(torch.equal(m, x.flip(3)) for x, m in zip(teacher.seen[::2], teacher.seen[1::2]))
    assert not torch.equal(teacher.seen[0], teacher.seen[1])  # a real mirror, not the same batch twice
    with pytest.raises(ValueError, match="teacher_tta"):
        TrainConfig(teacher_tta="yes")


def test_distillation_without_a_teacher_is_refused(small_data):
    with pytest.raises(ValueError, match="needs a teacher"):
        train(create_model("resnet", width=2, blocks=(1, 1, 1)), small_data, TrainConfig(epochs=1, distill=0.5))


def test_progress_is_an_updating_line_on_a_terminal_and_a_line_a_minute_in_a_log(capsys, monkeypatch):
    progress = Progress(
        epoch=2, epochs=15, images=12_800, epoch_images=45_056, images_per_second=101.6, seconds_left=5_432
    )
    line = "epoch 2/15  12,800/45,056 images  102 img/s  5,432s left"
    monkeypatch.setattr(train_module, "_last_logged", -math.inf)
    print_progress(progress)  # a log: the first line at once ...
    print_progress(progress)  # ... the next one a minute later
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setattr(train_module, "_last_logged", train_module.time.monotonic() - 61)
    print_progress(progress)
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    print_progress(progress)
    print_progress(progress)  # a terminal: every call rewrites the one line
    assert capsys.readouterr().err == f"\r  {line}\x1b[K" * 2
