from pathlib import Path

import pytest
import torch
from PIL import Image

from microsearch.evaluation import data as data_module
from microsearch.evaluation.data import DataConfig, DataError, load_data, synthetic_images


def test_synthetic_is_seeded_and_well_formed():
    a, b = synthetic_images(50, seed=3), synthetic_images(50, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (50, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.min() >= 0 and a.labels.max() <= 9
    assert not torch.equal(a.images, synthetic_images(50, seed=4).images)


def test_validation_split_is_held_out_with_a_fixed_seed():
    data = load_data(DataConfig("synthetic:500", val_size=100, seed=7))
    again = load_data(DataConfig("synthetic:500", val_size=100, seed=7))
    other = load_data(DataConfig("synthetic:500", val_size=100, seed=8))
    assert (len(data.train), len(data.val), len(data.test)) == (400, 100, 100)
    assert torch.equal(data.val.images, again.val.images)
    assert not torch.equal(data.val.images, other.val.images)
    # the two splits partition the source: every image appears exactly once
    full = synthetic_images(500, seed=1).images.flatten(1)
    both = torch.cat([data.train.images, data.val.images]).flatten(1)
    assert torch.equal(full.sort(0).values, both.sort(0).values)


def _tree(root: Path, classes=("cat", "dog"), per_class=3, size=32) -> None:
    for c, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c + i,) * 3).save(root / "train" / name / f"{i}.png")


def test_imagefolder_decodes_once_and_caches(tmp_path):
    _tree(tmp_path / "imgs")
    config = DataConfig(f"imagefolder:{tmp_path / 'imgs'}", val_size=2, cache_dir=str(tmp_path / "cache"))
    data = load_data(config)
    assert data.classes == ["cat", "dog"]
    assert len(data.train) + len(data.val) == 6 and data.test is None
    labels = torch.cat([data.train.labels, data.val.labels])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    pixel = {int(img[0, 0, 0]) for img in torch.cat([data.train.images, data.val.images])}
    assert pixel == {0, 1, 2, 40, 41, 42}
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1


def test_imagefolder_second_start_uses_the_cache(tmp_path, monkeypatch):
    _tree(tmp_path / "imgs")
    config = DataConfig(f"imagefolder:{tmp_path / 'imgs'}", val_size=1, cache_dir=str(tmp_path / "c"))
    first = load_data(config)
    monkeypatch.setattr(data_module.Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    second = load_data(config)
    assert torch.equal(first.train.images, second.train.images)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("imagefolder:/no/such/folder", "does not exist"),
        ("imagefolder:", "needs a path"),
        ("synthetic:abc", "integer"),
        ("mnist", "unknown data source"),
    ],
)
def test_bad_sources_have_clear_errors(source, needle):
    with pytest.raises(DataError, match=needle):
        load_data(DataConfig(source))


def test_corrupt_image_is_named(tmp_path):
    _tree(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "cat" / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*1\.png"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'imgs'}", val_size=1, cache_dir=str(tmp_path)))


def test_wrong_image_size_and_empty_tree(tmp_path):
    _tree(tmp_path / "big", size=40)
    with pytest.raises(DataError, match="expected 32x32"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'big'}", val_size=1, cache_dir=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'empty'}", cache_dir=str(tmp_path)))
    (tmp_path / "one" / "cat").mkdir(parents=True)  # one class: every prediction would be right
    with pytest.raises(DataError, match="only the class folder 'cat'; a classifier needs two or more"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'one'}", cache_dir=str(tmp_path)))


def test_validation_larger_than_the_data_is_refused():
    with pytest.raises(DataError, match="val_size 5000 leaves no training images"):
        load_data(DataConfig("synthetic:1000", val_size=5000))


class _FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10: HWC uint8 arrays, a list of labels, class names."""

    def __init__(self, root, train, download):
        self.classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        import numpy as np

        n = 30 if train else 10
        self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(n, 32, 32, 3)
        self.targets = [i % 10 for i in range(n)]


def test_cifar10_source_converts_to_chw_and_keeps_its_test_split(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    data = load_data(DataConfig("cifar10", val_size=5, cache_dir=str(tmp_path)))
    assert (len(data.train), len(data.val), len(data.test)) == (25, 5, 10)
    assert data.test.images.shape == (10, 3, 32, 32) and data.classes[0] == "airplane"
    fake = _FakeCIFAR10(None, False, False)
    assert torch.equal(data.test.images[3], torch.from_numpy(fake.data[3]).permute(2, 0, 1))


def test_cifar10_download_failure_is_one_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"cannot get CIFAR-10 into .*cifar10: <urlopen error"):
        load_data(DataConfig("cifar10", cache_dir=str(tmp_path)))


def test_a_damaged_decode_cache_is_named_and_can_be_deleted(tmp_path):
    _tree(tmp_path / "imgs")
    config = DataConfig(f"imagefolder:{tmp_path / 'imgs'}", val_size=1, cache_dir=str(tmp_path / "c"))
    first = load_data(config)
    (cache,) = (tmp_path / "c").glob("imagefolder-*.pt")
    for damaged in (cache.read_bytes()[:100], b""):  # cut short, then empty
        cache.write_bytes(damaged)
        with pytest.raises(DataError, match=f"the decoded-image cache {cache} is damaged; delete it"):
            load_data(config)
    blob = {"images": torch.zeros(5, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(5), "classes": ["cat"]}
    torch.save(blob, cache)  # a readable file that does not hold this tree's 6 images
    with pytest.raises(DataError, match="is damaged"):
        load_data(config)
    cache.unlink()
    assert torch.equal(load_data(config).train.images, first.train.images)  # decoded again
