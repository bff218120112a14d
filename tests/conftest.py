import pytest
import torch

from microsearch.evaluation.data import DataConfig, load_data


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_data():
    """A small synthetic set: 1,600 training and 400 validation images."""
    return load_data(DataConfig("synthetic:2000", val_size=400))
