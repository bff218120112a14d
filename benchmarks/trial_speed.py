"""How fast one trial trains: microsearch's own training step, precisions, compilation, recipes.

One run, one JSON file:
1. images/s of ``train()`` (its device loader, augmentation and step) for the float and the 4/4-bit
   ResNet-20 (first conv and classifier at 8 bits), at fp32 and at the auto precision, eager and
   compiled, beside a plain channels_last loop over the float model in bf16 autocast and in fp32
   (the ceiling: no augmentation, no bookkeeping) and the same loop in fp32 NCHW (how microsearch
   trained on the CPU before its precision policy). Throughput is that of the last epoch (the
   steady state); compile seconds come from the first. Where the hardware runs no bf16 natively
   (auto = fp32), only fp32 is measured, and the plain loop in both precisions shows why.
2. Operations dispatched per training step (torch profiler: aten operations not called by another).
3. Validation accuracy after ``--epochs`` epochs on ``--data`` for the 4/4-bit ResNet-20 trained
   with each recipe (at the recipe's own batch size and translation), same seed and data.
   ``--recipes baseline`` and ``--recipes fast`` with ``--threads 1`` run two recipes side by side
   on two cores.

    python benchmarks/trial_speed.py --data imagefolder:~/data/cifar10-jpeg \
        --out benchmarks/results/trial_speed_cpu.json
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from microsearch import code_version
from microsearch.compression import QuantConfig, calibrate_, quantize_
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.train import (
    RECIPES,
    TrainConfig,
    device_name,
    precision_name,
    resolve_device,
    resolve_precision,
    train,
)
from microsearch.models import create_model

QUANT = QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8)


def build(quantized: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20")
    if quantized:
        quantize_(model, QUANT)
    return model


def plain_loop(device: torch.device, batch: int, steps: int, bf16: bool, layout: str = "channels_last") -> float:
    """Images/s of the simplest step over the float ResNet-20, in bf16 autocast or fp32."""
    memory_format = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}[layout]
    model = build(False).to(device, memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def ops_per_step(quantized: bool, config: TrainConfig, device: torch.device) -> int:
    """aten operations dispatched by one step as ``train`` runs it (eager or compiled)."""
    dtype = resolve_precision(config.precision, device)
    model = build(quantized).to(device, memory_format=torch.channels_last).train()
    x = torch.randn(config.batch_size, 3, 32, 32, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (config.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        calibrate_(model, x)
    step_model = torch.compile(model) if config.compile == "on" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(step_model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    return sum(
        1
        for e in events
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imagefolder:~/data/cifar10-jpeg", help="source for the recipe comparison")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the recipe comparison")
    p.add_argument("--speed-images", type=int, default=6144, help="training images per epoch of the speed runs")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed runs (medians)")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the speed runs (recipes use their own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-recipes", action="store_true", help="only measure speed")
    p.add_argument("--skip-speed", action="store_true", help="only compare the recipes")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes to compare")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe {unknown[0]!r}; use some of {', '.join(RECIPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    auto = precision_name(resolve_precision("auto", device))
    result = {
        "device": device_name(device),
        "auto_precision": auto,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "version": code_version(),
        "batch_size": args.batch_size,
        "speed": [],
        "recipes": [],
    }

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    speed_data = load_data(DataConfig(f"synthetic:{args.speed_images + 512}", val_size=512))
    # Both precisions of the plain loop show what "auto" chose between; where the hardware has no
    # native bf16 (emulated, about 10x slower) a few steps are enough to show it. The runs of each
    # round go one after the other and the rounds repeat them, so a machine that slows down for a
    # while slows every configuration alike; the medians over the rounds are reported.
    plain = {"fp32": (False, "channels_last"), "bf16": (True, "channels_last"), "fp32 NCHW": (False, "NCHW")}
    configs = [
        (quantized, precision, compiled)
        for quantized in (False, True)
        for precision in dict.fromkeys(("fp32", auto))  # one precision where auto is fp32
        for compiled in ("off", "on")
    ]
    plain_samples = {name: [] for name in plain}
    samples = {c: [] for c in configs}
    compile_seconds = {}
    for round_ in range(0 if args.skip_speed else args.rounds):
        for name, (bf16, layout) in plain.items():
            steps = 4 if bf16 and auto != "bf16" else 20
            plain_samples[name].append(plain_loop(device, args.batch_size, steps, bf16, layout))
        for quantized, precision, compiled in configs:
            config = TrainConfig(
                epochs=2, batch_size=args.batch_size, precision=precision, compile=compiled, device=str(device)
            )
            history = train(build(quantized), speed_data, config)
            samples[quantized, precision, compiled].append(history[-1].images_per_second)
            compile_seconds.setdefault((quantized, precision, compiled), history[0].compile_seconds)
            print(
                f"round {round_ + 1}: {quantized=} {precision} compile={compiled} "
                f"{history[-1].images_per_second:,.0f} images/s",
                flush=True,
            )
    if not args.skip_speed:
        # After the timed runs: compiling here first would warm the cache their compile seconds measure.
        ops = {
            (q, precision, compiled): ops_per_step(
                q,
                TrainConfig(batch_size=args.batch_size, precision=precision, compile=compiled, device=str(device)),
                device,
            )
            for q, precision, compiled in configs
        }
        result["plain_loop_images_per_second"] = {k: statistics.median(v) for k, v in plain_samples.items()}
        result["plain_loop_samples"] = plain_samples
        result["speed"] = [
            {
                "model": "resnet20 4/4-bit (first/last 8)" if quantized else "resnet20 float",
                "precision": precision_name(resolve_precision(precision, device)),
                "compiled": compiled == "on",
                "images_per_second": statistics.median(samples[quantized, precision, compiled]),
                "samples": samples[quantized, precision, compiled],
                "compile_seconds": compile_seconds[quantized, precision, compiled],  # first round: cold cache
                "ops_per_step": ops[quantized, precision, compiled],
            }
            for quantized, precision, compiled in configs
        ]
        save()
    if args.skip_recipes:
        return
    data = load_data(DataConfig(args.data))
    for recipe in recipes:
        start = time.perf_counter()
        config = TrainConfig(epochs=args.epochs, recipe=recipe, device=str(device))  # the recipe's batch size
        history = train(
            build(True),
            data,
            config,
            on_epoch=lambda s, r=recipe: print(
                f"{r} epoch {s.epoch}: val {s.val_acc:.2%} {s.seconds:.0f}s", flush=True
            ),
        )
        row = {
            "recipe": recipe,
            "model": "resnet20 4/4-bit (first/last 8)",
            "data": args.data,
            "epochs": args.epochs,
            "batch_size": config.batch_size,
            "crop": config.crop,
            "threads": torch.get_num_threads(),
            "val_acc": history[-1].val_acc,
            "val_acc_per_epoch": [h.val_acc for h in history],
            "seconds": time.perf_counter() - start,
            "precision": auto,
        }
        result["recipes"].append(row)
        save()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
