import re

import pytest
import torch
from torch.nn.utils import prune

from microsearch.checkpoint import load_model, save_model
from microsearch.compression import QuantConfig, current_plan, quantize_, snap_weights_
from microsearch.evaluation import audit
from microsearch.models import create_model


def _quantized_model():
    model = create_model("resnet", width=4, blocks=(1, 1, 1), mid_channels=(2, 3, 5))
    quantize_(model, QuantConfig(weight_bits=3, act_bits=5, first_last_bits=8))
    model.train()
    model(torch.randn(8, 3, 32, 32))  # calibrates the quantizers
    with torch.no_grad():
        model.stages[0][0].conv2[0].weight[:, :1] = 0  # some unstructured sparsity
    return model.eval()


def test_round_trip_keeps_logits_architecture_bits_and_score(tmp_path):
    model = _quantized_model()
    x = torch.randn(4, 3, 32, 32)
    save_model(tmp_path / "model.pt", model, {"val_acc": 0.5, "passes": 1})
    blob = torch.load(tmp_path / "model.pt", weights_only=True)  # plain tensors and containers
    assert blob["model"]["config"]["mid_channels"] == (2, 3, 5)
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta == {"val_acc": 0.5, "passes": 1}
    assert current_plan(loaded) == current_plan(model)
    assert torch.equal(loaded(x), model(x))
    assert audit(loaded).to_dict() == audit(model).to_dict()


def test_a_loaded_quantized_model_compiles_into_one_graph(tmp_path):
    # A teacher is loaded and compiled without a calibration pass: a quantizer that read its
    # levels from its buffers in the forward pass broke the graph at every layer (28 breaks here).
    save_model(tmp_path / "model.pt", _quantized_model())
    loaded, _ = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        explained = torch._dynamo.explain(loaded)(torch.randn(4, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_a_snapped_model_is_stored_as_int8_levels_and_loads_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20")
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    model.train()
    model(torch.randn(16, 3, 32, 32))
    model.eval()
    save_model(tmp_path / "latent.pt", model)  # latent float weights: stored as they are
    assert torch.load(tmp_path / "latent.pt", weights_only=True)["weight_levels"] == {}
    snap_weights_(model)
    save_model(tmp_path / "levels.pt", model)
    blob = torch.load(tmp_path / "levels.pt", weights_only=True)
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(blob["weight_levels"]) == weights and not weights & set(blob["state_dict"])
    assert all(v.dtype == torch.int8 for v in blob["weight_levels"].values())
    size = (tmp_path / "levels.pt").stat().st_size
    assert size < 0.4 * (tmp_path / "latent.pt").stat().st_size  # 8 of 32 bits per weight, plus the rest
    loaded, _ = load_model(tmp_path / "levels.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert audit(loaded).to_dict() == audit(model).to_dict()
    blob["weight_levels"]["fc.weight"] = blob["weight_levels"]["fc.weight"][:, :3]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"fc.weight: levels of shape \(10, 3\) do not fit"):
        load_model(tmp_path / "bad.pt")


def test_half_model_stays_half(tmp_path):
    model = create_model("resnet", width=4, blocks=(1, 1, 1)).half()
    save_model(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert next(loaded.parameters()).dtype == torch.float16
    assert audit(loaded).score == audit(model).score


def test_masks_must_be_made_permanent_first(tmp_path):
    model = create_model("resnet", width=4, blocks=(1, 1, 1))
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    with pytest.raises(ValueError, match="pruning masks"):
        save_model(tmp_path / "m.pt", model)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a microsearch-model/1 file"):
        load_model(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda b: b.pop("quant_plan"), r"missing \['quant_plan'\]"),
        (lambda b: b.update(dtype="float77"), "dtype 'float77' is not a floating-point torch dtype"),
        (lambda b: b.update(dtype="Tensor"), "dtype 'Tensor' is not a floating-point torch dtype"),
        (lambda b: b.update(model={"name": "nosuch", "config": {}}), "unknown model 'nosuch'"),
        (lambda b: b.update(model="resnet"), "string indices"),
        (lambda b: b["quant_plan"].update({"stem.0": {"weight": 99, "act": 4, "bias": 16}}), "got 99"),
        (lambda b: b["state_dict"].pop("fc.bias"), r"1 missing \(e.g. \['fc.bias'\]\), 0 unexpected"),
    ],
)
def test_a_damaged_model_file_fails_with_one_line_naming_it(tmp_path, capsys, damage, needle):
    from microsearch.cli import main

    save_model(tmp_path / "good.pt", create_model("resnet", width=4, blocks=(1, 1, 1)))
    blob = torch.load(tmp_path / "good.pt", weights_only=True)
    damage(blob)
    torch.save(blob, tmp_path / "bad.pt")
    assert main(["score", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'bad.pt'}: a damaged microsearch-model/1 file" in err
    assert re.search(needle, err)


def test_a_truncated_or_empty_model_file_is_named(tmp_path, capsys):
    from microsearch.cli import main

    save_model(tmp_path / "good.pt", create_model("resnet", width=4, blocks=(1, 1, 1)))
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "empty.pt"):
        assert main(["score", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name} is not a readable model file (truncated" in err
