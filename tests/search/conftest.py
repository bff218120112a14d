import uuid
from pathlib import Path

import pytest

TINY = """
[study]
name = "{name}"
target = {target}
device = "cpu"
heartbeat = 1
grace = 3

[data]
source = "synthetic:{images}"
val_size = 100

[budget]
epochs = {epochs}
finetune_epochs = 0
trials = 2
batch_size = 50

[space]
width = [2, 4]
depth = [1, 1]
multipliers = [1, 2]
blocks = ["basic"]
weight_bits = [4, 8]
act_bits = [4, 8]
cutout = [0, 0]
mixup = [0.0, 0.0]

[pruner]
warmup_epochs = 0
"""


@pytest.fixture
def tiny_study(tmp_path: Path):
    """Write a study file for a tiny, fast search; returns a function of a few knobs."""

    def write(target: float = 0.2, images: int = 300, epochs: int = 1, name: str | None = None) -> Path:
        name = name or f"t{uuid.uuid4().hex[:8]}"
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY.format(name=name, target=target, images=images, epochs=epochs))
        return path

    return write


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """A finished tiny study (3 trials, a low target so some are feasible): its file and config."""
    from microsearch.cli import main
    from microsearch.search import load_study

    folder = tmp_path_factory.mktemp("searched")
    path = folder / "done.toml"
    path.write_text(TINY.format(name="done", target=0.15, images=1000, epochs=3))
    assert main(["search", str(path), "--n-trials", "3"]) == 0
    return path, load_study(path)
