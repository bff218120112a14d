"""Training throughput: microsearch's device loader + trainer vs the usual tutorial loop.

Both train the same model with the same batch size, optimizer and loss for the same number of
images; the tutorial loop reads PIL images through a torchvision DataLoader with RandomCrop,
RandomHorizontalFlip, ToTensor and Normalize. Prints images/second for both and their ratio.

    python benchmarks/train_throughput.py --data synthetic --images 10000 --out benchmarks/results/x.json
"""

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from microsearch.evaluation.data import DataConfig, Dataset, load_data
from microsearch.evaluation.loader import CIFAR_MEAN, CIFAR_STD
from microsearch.evaluation.train import TrainConfig, device_name, resolve_device, train
from microsearch.models import create_model


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: one PIL image per item, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def tutorial_loop(data: Dataset, model_name: str, args, device: torch.device) -> float:
    """Images per second of one epoch of the classic DataLoader + PIL training loop."""
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    dataset = PILImages(data.train.images, data.train.labels, transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(0)
    model = create_model(model_name).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def ours(data: Dataset, model_name: str, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(model_name)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, device=str(device))
    return train(model, data, config)[0].images_per_second


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="data source, e.g. imagefolder:~/data/cifar10-jpeg")
    p.add_argument("--images", type=int, default=10_000, help="training images per measured epoch")
    p.add_argument("--model", default="resnet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorial loop")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args()
    device = resolve_device(args.device)
    full = load_data(DataConfig(args.data, val_size=0))
    n = min(args.images, len(full.train))
    data = Dataset(
        train=type(full.train)(full.train.images[:n], full.train.labels[:n]),
        val=type(full.train)(full.train.images[:0], full.train.labels[:0]),  # no validation pass
        test=None,
        classes=full.classes,
    )
    ours(data, args.model, args, device)  # warm-up (allocator, cuDNN autotuning)
    result = {
        "device": device_name(device),
        "data": args.data,
        "images": n,
        "model": args.model,
        "batch_size": args.batch_size,
        "tutorial_workers": args.workers,
        "tutorial_images_per_second": tutorial_loop(data, args.model, args, device),
        "ours_images_per_second": ours(data, args.model, args, device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/train_throughput.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    result["ratio"] = result["ours_images_per_second"] / result["tutorial_images_per_second"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
