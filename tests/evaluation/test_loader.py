import torch

from microsearch.evaluation.data import Split
from microsearch.evaluation.loader import DeviceLoader, cutout, random_crop, random_flip

CPU = torch.device("cpu")


def _unique_images(n: int) -> torch.Tensor:
    return torch.arange(n * 3 * 8 * 8, dtype=torch.int64).view(n, 3, 8, 8) + 1


def test_random_crop_takes_a_window_of_the_padded_image():
    x = _unique_images(16)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert len(windows) == 1
        offsets.add(windows[0])
    assert len(offsets) > 1  # offsets differ between samples


def test_random_flip_mirrors_about_half():
    x = _unique_images(200)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 60 < sum(flipped) < 140


def test_cutout_zeroes_at_most_a_square():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 8, torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max() <= 9 * 9 and zeros.min() >= 5 * 5  # clipped at the border, never absent
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # same square on every channel


def test_training_batches_are_shuffled_full_and_normalised():
    split = Split(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100))
    loader = DeviceLoader(split, 32, CPU, train=True, crop=4, flip=True, cutout=8, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # the partial batch is dropped
    assert all(x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert labels.unique().numel() == 96 and not torch.equal(labels, torch.arange(96))


def test_evaluation_batches_cover_every_image_in_order():
    split = Split(torch.full((10, 3, 32, 32), 128, dtype=torch.uint8), torch.arange(10))
    batches = list(DeviceLoader(split, 4, CPU))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    x = batches[0][0]
    expected = (128 / 255 - 0.4914) / 0.2470
    assert torch.allclose(x[:, 0], torch.full_like(x[:, 0], expected), atol=1e-5)
