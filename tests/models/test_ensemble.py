import pytest
import torch

from microsearch.models import Ensemble, create_model


def test_an_ensemble_gives_the_mean_of_its_members_logits():
    torch.manual_seed(0)
    a, b = create_model("resnet", width=4, blocks=(1, 1, 1)).eval(), create_model("convnet", widths=(8, 8)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = Ensemble([a, b]).eval()(x)
        assert out.shape == (3, 10) and out.dtype == torch.float32
        assert torch.allclose(out, (a(x) + b(x)) / 2, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert Ensemble([a, b])(x).dtype == torch.float32  # float32 soft labels under autocast


def test_an_ensemble_needs_two_models_of_the_same_classes():
    a = create_model("resnet", width=4, blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="two or more models of the same classes, got 2"):
        Ensemble([a, create_model("resnet", width=4, blocks=(1, 1, 1), num_classes=5)])
    with pytest.raises(ValueError, match="got 1"):
        Ensemble([a])
