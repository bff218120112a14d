import torch

from microsearch.evaluation.data import Split
from microsearch.evaluation.loader import DeviceLoader, cutout, flip_where, place, random_crop

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


def test_flip_where_mirrors_exactly_the_marked_images():
    x = _unique_images(6)
    flip = torch.tensor([True, False, True, False, False, True])
    out = flip_where(x, flip)
    for o, i, f in zip(out, x, flip):
        assert torch.equal(o, i.flip(2) if f else i)


def test_random_crop_with_reflect_padding_mirrors_the_border():
    x = _unique_images(32).float()
    out = random_crop(x, 2, torch.Generator().manual_seed(0), mode="reflect")
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    assert all(
        any(torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i]) for dy in range(5) for dx in range(5))
        for i in range(32)
    )
    assert (out == 0).sum() == 0  # no zero padding anywhere


def _flips(loader: DeviceLoader, images: torch.Tensor) -> dict[int, bool]:
    """label -> whether the loader mirrored that image in one epoch."""
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1) * 255
    normalised = (images.float() - mean) / std
    out = {}
    for x, y in loader:
        for img, label in zip(x, y.tolist()):
            out[label] = torch.allclose(img, normalised[label].flip(2)) and not torch.allclose(img, normalised[label])
    return out


def test_alternate_flip_mirrors_each_image_in_every_other_epoch():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(Split(images, torch.arange(64)), 16, CPU, train=True, flip=True, alternate_flip=True)
    first, second, third = (_flips(loader, images) for _ in range(3))
    assert 16 < sum(first.values()) < 48  # a random half in the first epoch
    assert all(second[i] != first[i] for i in range(64))  # then the other half
    assert third == first


def test_a_split_is_placed_on_a_device_once_per_dtype():
    split = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8))
    images, _ = place(split, CPU, torch.bfloat16)
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    assert place(split, CPU, torch.bfloat16)[0] is images  # reused, not uploaded again
    assert place(split, CPU, torch.float32)[0].dtype == torch.float32
    assert len(split.placed) == 2


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
