import pytest
import torch
from torch import nn

from microsearch.compression import (
    QuantConfig,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    calibrate_,
    calibrated,
    clamp_binary_weights_,
    current_plan,
    install_training_hooks,
    quant_plan,
    quantize_,
    requantize_layers_,
    set_quantization_,
    snap_weights_,
    weight_levels,
)
from microsearch.models import create_model


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_b_bit_weights_take_at_most_2_to_the_b_values_and_pass_gradients(bits):
    q = Quantizer(bits, signed=True)
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    out = q(w)
    assert out.unique().numel() <= 2**bits
    assert out.unique().numel() >= min(2**bits, 2)
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    if q.scale is not None:
        assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_a_2_bit_quantizer_rounds_clips_and_has_lsq_gradients():
    q = Quantizer(2, signed=True)  # levels -2, -1, 0, 1
    with torch.no_grad():
        q.scale.fill_(0.5)
        q.initialized.fill_(True)
    x = torch.tensor([-2.0, -0.6, -0.2, 0.1, 0.3, 0.8, 5.0], requires_grad=True)
    out = q(x)  # x / 0.5 = -4, -1.2, -0.4, 0.2, 0.6, 1.6, 10 -> clipped to [-2, 1], rounded
    assert out.tolist() == [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5]
    out.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0, 0]  # straight through inside the range only
    # LSQ: d out / d step is round(x/s) - x/s inside, the clipping level outside; the sum
    # (-2 + 0.2 + 0.4 - 0.2 + 0.4 + 1 + 1 = 0.8) is scaled by 1 / sqrt(N * Q_P) = 1 / sqrt(7 * 1)
    assert q.scale.grad.item() == pytest.approx(0.8 / 7**0.5, rel=1e-5)


def test_16_bits_is_half_precision_rounding():
    x = torch.randn(1000) * 100
    assert torch.equal(Quantizer(16)(x), x.half().float())
    assert torch.equal(Quantizer(32)(x), x)


def test_activation_quantizer_picks_unsigned_levels_for_nonnegative_inputs():
    q = Quantizer(4, signed=None)
    out = q(torch.rand(100, 16))  # post-ReLU-like inputs
    assert not bool(q.signed)
    assert out.min() >= 0 and out.unique().numel() <= 16


def test_binary_connect_is_sign_and_clamps_latent_weights():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, QuantConfig(weight_bits=1, act_bits=8))
    layer = model[0]
    assert set(layer.weight_quant(layer.weight).unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        layer.weight.mul_(10)
    clamp_binary_weights_(model)
    assert layer.weight.abs().max() <= 1


def test_quantize_swaps_layers_in_place_and_keeps_parameters():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8))
    assert isinstance(model.stem[0], QuantConv2d) and isinstance(model.fc, QuantLinear)
    for name, p in before.items():
        assert torch.equal(model.get_parameter(name), p)
    assert model(x).shape == (2, 10)


def test_first_and_last_layer_keep_more_bits():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    plan = quant_plan(model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=8))
    assert plan["stem.0"]["weight"] == 8 and plan["fc"]["act"] == 8
    assert plan["stages.0.0.conv1.0"] == {"weight": 2, "act": 4, "bias": 16}
    quantize_(model, QuantConfig(weight_bits=2, act_bits=4, first_last_bits=8))
    assert current_plan(model) == plan


def test_per_layer_overrides_and_their_errors():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    plan = quant_plan(model, QuantConfig(4, 4, layer_bits={"stages.1.0.conv2.0": (3, 5)}))
    assert plan["stages.1.0.conv2.0"]["weight"] == 3 and plan["stages.1.0.conv2.0"]["act"] == 5
    with pytest.raises(ValueError, match="unknown layers"):
        quant_plan(model, QuantConfig(4, 4, layer_bits={"nope": (4, 4)}))
    # a module prefix names every layer under it; the most specific key wins
    plan = quant_plan(model, QuantConfig(4, 4, layer_bits={"stages.1": (3, 3), "stages.1.0.conv2.0": (2, 4)}))
    under = {n: (b["weight"], b["act"]) for n, b in plan.items() if n.startswith("stages.1.") and b["weight"] < 16}
    assert under == {"stages.1.0.conv1.0": (3, 3), "stages.1.0.conv2.0": (2, 4), "stages.1.0.shortcut.0": (3, 3)}
    assert (plan["stages.2.0.conv1.0"]["weight"], plan["stem.0"]["act"]) == (4, 4)
    with pytest.raises(ValueError, match=r"unknown layers \['stages.1.0.conv'\]"):  # names, not text prefixes
        quant_plan(model, QuantConfig(4, 4, layer_bits={"stages.1.0.conv": (3, 3)}))


def test_requantizing_some_layers_calibrates_them_again_and_keeps_every_other_step():
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    quantize_(model, QuantConfig(4, 4, first_last_bits=8))
    calibrate_(model, torch.randn(8, 3, 32, 32))
    steps = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_quant.scale")}
    weights = {n: p for n, p in model.named_parameters() if not n.endswith("_quant.scale")}
    plan = requantize_layers_(model, {"stages.2": (3, 3), "stem.0": (8, 8)})  # the stem keeps its bits
    assert sorted(plan) == ["stages.2.0.conv1.0", "stages.2.0.conv2.0", "stages.2.0.shortcut.0"]
    assert all(bits == {"weight": 3, "act": 3, "bias": 16} for bits in plan.values())
    assert {n: b for n, b in current_plan(model).items() if n in plan} == plan
    assert not calibrated(model)  # the three new quantizer pairs wait for a batch
    for name, p in model.named_parameters():
        if (name.endswith("_quant.scale") and not name.startswith(tuple(plan))) or name in weights:
            assert torch.equal(p, steps.get(name, weights.get(name))), name  # kept as they were
    assert model.get_parameter("stages.2.0.conv1.0.weight") is weights["stages.2.0.conv1.0.weight"]
    calibrate_(model, torch.randn(8, 3, 32, 32))
    new_step = model.get_parameter("stages.2.0.conv2.0.weight_quant.scale").item()
    assert new_step > 1.3 * steps["stages.2.0.conv2.0.weight_quant.scale"].item()  # 3 levels a side, not 7
    assert requantize_layers_(model, {"stages.2": (3, 3)}) == {}  # already there: nothing changes


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"weight_bits": 9}, "weight_bits"), ({"act_bits": 1}, "act_bits"), ({"bias_bits": 4}, "bias_bits")],
)
def test_invalid_bits_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantConfig(**kwargs)


def test_quantization_aware_training_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :4].argmax(1)  # a learnable rule
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_loading_a_state_dict_replaces_cached_levels():
    calibrated = Quantizer(4, signed=None)
    calibrated(torch.rand(64))  # non-negative: unsigned levels 0..15
    other = Quantizer(4, signed=None)
    other(-torch.rand(64))  # negative: signed levels, cached on the host
    other.load_state_dict(calibrated.state_dict())
    x = torch.rand(64) * 3
    assert torch.equal(other(x), calibrated(x))
    assert other(x).min() >= 0


def _lsq_reference(x: torch.Tensor, step: float, lo: int, hi: int, g: float):
    """LSQ (Esser et al. 2020) written out: value, d/dx and d/dstep of sum(out * upstream)."""
    v = x.double() / step
    inside = (v >= lo) & (v <= hi)
    value = torch.round(v.clamp(lo, hi)) * step
    dstep = torch.where(inside, torch.round(v) - v, v.clamp(lo, hi))  # -Q_N below, Q_P above
    return value, inside.double(), dstep * g


def _compare_with_reference(quantizer: Quantizer, x: torch.Tensor, autocast: bool) -> None:
    step = float(quantizer.scale.detach().abs()) + 1e-8
    lo, hi = quantizer.levels()
    n = x[0].numel() if quantizer.per_sample else x.numel()
    value, dx, dstep = _lsq_reference(x.detach().float(), step, lo, hi, 1 / (n * hi) ** 0.5)
    upstream = torch.linspace(-1, 1, x.numel()).view_as(x)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = quantizer(x)
    (out.float() * upstream).sum().backward()
    assert out.dtype == torch.float32  # quantizer math in float32 under autocast too
    torch.testing.assert_close(out.double(), value, rtol=0, atol=1e-6 * step * hi)
    # the input gradient comes back in the input's dtype (bf16 rounds the upstream values)
    torch.testing.assert_close(x.grad, (dx * upstream.double()).to(x.dtype), rtol=0, atol=1e-6)
    expected = (dstep * upstream.double()).sum()
    torch.testing.assert_close(quantizer.scale.grad.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_matches_the_lsq_formula_in_value_and_every_gradient(bits, autocast):
    torch.manual_seed(bits)
    x = torch.randn(8, 4, 6, 6) * 2
    if autocast:
        x = x.bfloat16()  # what a bf16 layer hands the next quantizer
    q = Quantizer(bits, signed=None, per_sample=True)
    q(x.float())  # calibrate on a batch with negative values: signed levels
    with torch.no_grad():
        q.scale.fill_(0.37)  # a step where values fall inside, on and outside the range
    _compare_with_reference(q, x, autocast)


def test_compiled_quantizer_matches_the_lsq_formula():
    torch.manual_seed(0)
    x = torch.randn(16, 8, 4, 4)
    q = Quantizer(4, signed=True, per_sample=True)
    q(x)
    compiled = torch.compile(q)
    step = float(q.scale.detach().abs()) + 1e-8
    value, dx, dstep = _lsq_reference(x, step, -8, 7, 1 / (x[0].numel() * 7) ** 0.5)
    xr = x.clone().requires_grad_()
    compiled(xr).sum().backward()
    torch.testing.assert_close(compiled(x).double(), value, rtol=0, atol=1e-6)
    torch.testing.assert_close(xr.grad.double(), dx)
    torch.testing.assert_close(q.scale.grad.double(), dstep.sum(), rtol=1e-4, atol=1e-7)


def test_the_step_gradient_scale_counts_one_sample_not_the_batch():
    q = Quantizer(4, signed=True, per_sample=True)
    one = torch.randn(1, 3, 5, 5)
    q(one)

    def step_grad(x: torch.Tensor) -> float:
        q.scale.grad = None
        q(x).sum().backward()
        return float(q.scale.grad)

    # Eight copies of one sample: eight times its gradient (a batch-size scale would give sqrt(8)x).
    assert step_grad(one.repeat(8, 1, 1, 1)) == pytest.approx(8 * step_grad(one), rel=1e-5)


def test_16_bits_rounds_like_float16_eagerly_and_compiled():
    x = torch.cat([torch.randn(4000) * s for s in (1e-7, 1e-5, 1e-3, 1.0, 300.0, 5e4)])
    x = torch.cat([x, torch.tensor([65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 0.0])])
    expected = x.half().float()
    assert torch.equal(Quantizer(16)(x), expected)
    activations = Quantizer(16, per_sample=True)
    assert torch.equal(torch.compile(activations)(x[None]), expected[None])
    assert torch.equal(Quantizer(16)(x.bfloat16()), x.bfloat16())  # bf16 is 16-bit already
    # Compiled training leaves 16-bit parameters unrounded (see Quantizer.split); eager rounds.
    assert torch.equal(torch.compile(Quantizer(16))(x), x)


def test_quantized_conv_runs_on_integer_levels_and_equals_the_fake_quantized_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
    layer = model[0]
    x = torch.relu(torch.randn(4, 8, 10, 10))
    layer(x)  # calibrate
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: None)
    original = layer._conv_forward
    layer._conv_forward = lambda xl, wl, b: seen.append((xl, wl)) or original(xl, wl, b)
    out = layer(x)
    handle.remove()
    x_levels, w_levels = seen[0]
    assert torch.equal(x_levels, x_levels.round()) and x_levels.min() >= 0 and x_levels.max() <= 15
    assert torch.equal(w_levels, w_levels.round()) and w_levels.min() >= -8 and w_levels.max() <= 7
    reference = nn.functional.conv2d(layer.act_quant(x), layer.weight_quant(layer.weight), padding=1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    x_bf16 = x.bfloat16()  # what a bf16 layer hands on; the reference quantizes the same values
    reference = nn.functional.conv2d(layer.act_quant(x_bf16.float()), layer.weight_quant(layer.weight), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x_bf16)
    # exact integer sums, rounded once to bf16 (8 significant bits) on the way out
    torch.testing.assert_close(low.float(), reference, rtol=2**-8, atol=1e-4)

    layer.eval()  # evaluation keeps the exact float32 sums under autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = layer(x_bf16)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)


def test_a_quantized_model_evaluates_the_same_logits_under_bf16_autocast_as_in_float32():
    torch.manual_seed(0)
    model = create_model("resnet20", width=8)
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    x = torch.randn(32, 3, 32, 32)
    calibrate_(model, x)
    model.train()
    for _ in range(3):  # move the batch statistics off their initial values
        model(x)
    model.eval()
    fp32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x)
    # only the order of float32 additions may differ: not one 4-bit level moves
    torch.testing.assert_close(bf16.float(), fp32, rtol=1e-4, atol=1e-4)


def test_batchnorm_without_momentum_keeps_a_cumulative_average():
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=None))
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8, bias_bits=32))
    batches = [torch.randn(16, 3, 4, 4) + k for k in range(3)]
    for b in batches:
        model(b)
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected, rtol=1e-5, atol=1e-5)


def test_binary_connect_clamp_is_an_optimizer_hook_installed_by_compression():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, QuantConfig(weight_bits=1, act_bits=8))
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    hooks = install_training_hooks(model, opt)
    assert len(hooks) == 1  # the clamp only: 1-bit weights have no learned step to bound
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert model[0].weight.abs().max() <= 1
    plain = nn.Sequential(nn.Linear(8, 4))
    quantize_(plain, QuantConfig(weight_bits=32, act_bits=16))
    assert install_training_hooks(plain, torch.optim.SGD(plain.parameters(), lr=0.1)) == []


def test_a_learned_weight_step_is_kept_where_some_weight_survives():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8))
    x = torch.randn(16, 8)
    model(x)  # calibrates
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    hooks = install_training_hooks(model, opt)
    step = model[0].weight_quant.scale
    step.grad = None
    for push, expected in ((-1e3, "max |w|"), (1e3, "just above zero")):  # far past every weight, then past 0
        opt.zero_grad()
        model(x).sum().backward()
        step.grad.fill_(push)
        opt.step()
        bound = float(model[0].weight.detach().abs().max())
        assert float(step.detach()) == pytest.approx(bound if expected == "max |w|" else 1e-8), expected
        assert model[0].weight_quant(model[0].weight).abs().max() > 0  # not every weight rounds to zero
    for hook in hooks:
        hook.remove()


def test_quantization_can_be_switched_off_and_calibrates_when_switched_on():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, QuantConfig(weight_bits=2, act_bits=2))
    x = torch.randn(16, 8)
    set_quantization_(model, False)
    assert torch.equal(model(x), nn.functional.linear(x, model[0].weight, model[0].bias))
    assert not calibrated(model)
    set_quantization_(model, True)
    calibrate_(model, x)
    assert calibrated(model)
    assert model[0].weight_quant(model[0].weight).unique().numel() <= 4


@pytest.mark.parametrize("block", ["basic", "dwsep", "mbconv"])
def test_2_bit_activations_are_unsigned_after_relu_and_use_all_four_levels(block):
    torch.manual_seed(0)
    model = create_model("resnet", width=4, blocks=(1, 1, 1), block=block)
    quantize_(model, QuantConfig(weight_bits=4, act_bits=2, first_last_bits=8))
    x = torch.randn(8, 3, 32, 32)
    calibrate_(model, x)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in layers.items()]
    model(x)  # in training mode, as calibrated
    for h in hooks:
        h.remove()
    assert bool(layers["stem.0"].act_quant.signed)  # the normalised image has negative values
    for name, layer in layers.items():
        # Every inner layer reads a ReLU output, except a separable block's pointwise convs,
        # which read their depthwise conv's BatchNorm output directly.
        signed = block == "dwsep" and name.endswith((".pw1.0", ".pw2.0"))
        if name in ("stem.0", "fc"):
            continue
        assert bool(layer.act_quant.signed) == signed, name
        levels, step = layer.act_quant.split(inputs[name])
        used = set(levels.unique().tolist())
        if signed:
            assert used <= {-2.0, -1.0, 0.0, 1.0}, name
        else:
            assert used == {0.0, 1.0, 2.0, 3.0}, name
        assert step > 0


def _calibrated_4_bit_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet", width=8, blocks=(1, 1, 1))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    model.train()
    model(torch.randn(16, 3, 32, 32))  # calibrates the quantizers
    return model.eval()


def test_snapped_weights_compute_the_same_and_their_zeros_count_as_zeros():
    from microsearch.evaluation import audit

    model = _calibrated_4_bit_resnet()
    x = torch.randn(4, 3, 32, 32)
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    with torch.no_grad():
        before = model(x)
        rounded_to_zero = sum(int((m.weight_quant(m.weight) == 0).sum()) for m in layers)
    assert all(int((m.weight == 0).sum()) == 0 for m in layers)  # the latent weights: no zero
    weights = sum(m.weight.numel() for m in layers)
    assert 0.1 * weights < rounded_to_zero < 0.9 * weights
    nonzero = audit(model).nonzero_params
    snap_weights_(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the same function, bit for bit
    assert audit(model).nonzero_params == nonzero - rounded_to_zero
    for m in layers:
        levels, step = m.weight_quant.split(m.weight)
        assert torch.equal(levels * step, m.weight)  # every weight is a level times the step
    snapped = {k: v.clone() for k, v in model.state_dict().items()}
    snap_weights_(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapped.items())
    assert set(weight_levels(model)) == {f"{n}.weight" for n, m in model.named_modules() if m in layers}
