"""Images per second of ``evaluate()`` (validation, a teacher's soft labels) by batch size.

On a CPU the activations of a large batch overflow the caches and the elementwise layers
(quantizers, BatchNorm, ReLU) run at memory speed; ``INFERENCE_BATCH`` in
``microsearch/evaluation/train.py`` is chosen from this benchmark. For each model file given (and
a freshly built float and 4/4-bit ResNet-20), it runs ``evaluate()`` over ``--images`` synthetic
images at each batch size, best of ``--rounds`` interleaved rounds, and checks that every batch
size gives the logits of the largest to the bit.

    python benchmarks/inference_batch.py benchmarks/results/2026-12-07-w24-f30-ft20-cpu-jpeg/model.pt \
        --out benchmarks/results/inference_batch_cpu.json
"""

import argparse
import json
import platform
import time

import torch

from microsearch import code_version
from microsearch.checkpoint import load_model
from microsearch.compression import QuantConfig, calibrate_, quantize_
from microsearch.evaluation import train as train_module
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.train import (
    device_name,
    evaluate,
    infer,
    precision_name,
    resolve_device,
    resolve_precision,
)
from microsearch.models import create_model


def built(quantized: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20")
    if quantized:
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
        calibrate_(model, torch.randn(256, 3, 32, 32))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model.pt files written by microsearch")
    parser.add_argument("--batches", default="1000,256,128,64,32")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = resolve_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    split = load_data(DataConfig(f"synthetic:{args.images + 10}", val_size=args.images, seed=0)).val
    x = torch.randn(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    models = {"resnet20 float (built)": built(False), "resnet20 4/4 (built, calibrated)": built(True)}
    models |= {path: load_model(path)[0] for path in args.models}
    rows = []
    for name, model in models.items():
        model = model.to(device, memory_format=torch.channels_last).eval()
        reference = infer(model, x, max(batches))
        best = {b: 0.0 for b in batches}
        for _ in range(args.rounds):  # interleaved: a slow moment of the machine hits every size
            for b in batches:
                train_module.INFERENCE_BATCH[device.type] = b
                start = time.perf_counter()
                evaluate(model, split, device, precision=args.precision)
                best[b] = max(best[b], len(split) / (time.perf_counter() - start))
        same = all(torch.equal(infer(model, x, b), reference) for b in batches)
        rows.append(
            {"model": name, "images_per_second": {str(b): round(r, 1) for b, r in best.items()}, "same_logits": same}
        )
        print(f"{name}: " + ", ".join(f"batch {b}: {r:,.0f}/s" for b, r in best.items()) + f"; same logits: {same}")
    result = {
        "device": device_name(device),
        "precision": precision_name(resolve_precision(args.precision, device)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "version": code_version(),
        "images": len(split),
        "rounds": args.rounds,
        "models": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
