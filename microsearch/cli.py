"""The ``microsearch`` command line: one sub-command per user task (``microsearch --help``)."""

import argparse
import ast
import contextlib
import json
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from microsearch import __version__, code_version
from microsearch.checkpoint import check_held_out, load_model, load_models, save_model
from microsearch.compression import (
    QuantConfig,
    apply_quant_plan_,
    current_plan,
    quantize_,
    requantize_layers_,
    snap_weights_,
)
from microsearch.evaluation import RULES, audit
from microsearch.evaluation.data import DataConfig, load_data
from microsearch.evaluation.plots import export_html, sweep_figure, write_html
from microsearch.evaluation.sweep import (
    METHODS,
    SweepContext,
    check_merge,
    check_ratios,
    finetune_config,
    li_sensitivity,
    run_sweep,
    save_rows,
)
from microsearch.evaluation.train import (
    COMPILE,
    PRECISIONS,
    RECIPES,
    STOP,
    EpochStats,
    TrainConfig,
    device_name,
    evaluate,
    precision_name,
    print_progress,
    resolve_device,
    resolve_precision,
    train,
)
from microsearch.evaluation.views import score_text
from microsearch.models import Ensemble, create_model, list_models, model_spec


def _parse_kv(pairs: list[str], what: str) -> dict[str, Any]:
    """``["width=8", "blocks=2,2,2"]`` -> ``{"width": 8, "blocks": (2, 2, 2)}``."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {pair!r} is not of the form key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _parse_layer_bits(pairs: list[str]) -> dict[str, tuple[int, int]]:
    """``["stages.2=3/3"]`` -> ``{"stages.2": (3, 3)}``."""
    out = {}
    for pair in pairs:
        name, _, bits = pair.partition("=")
        w, _, a = bits.partition("/")
        if not (name and w.isdigit() and a.isdigit()):
            raise ValueError(f"--layer-bits {pair!r} is not of the form NAME=W/A, e.g. stages.2=3/3")
        out[name] = (int(w), int(a))
    return out


def _log(message: str) -> None:
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # over an updating progress line
    print(clear + message, file=sys.stderr, flush=True)


def cmd_score(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give either a model file or --model NAME")
    if args.checkpoint:
        if args.model_arg or args.weight_bits or args.act_bits or args.layer_bits:
            raise ValueError("--model-arg and the --*-bits options apply to --model, not to a model file")
        model, meta = load_model(args.checkpoint)
        passes = meta.get("passes", 1)
        args.rule = args.rule or meta.get("rule", "lab4")  # the rule the file was scored under
    else:
        torch.manual_seed(0)  # a fixed initialisation, so counted nonzeros are reproducible
        model = create_model(args.model, **_parse_kv(args.model_arg, "--model-arg"))
        if args.weight_bits or args.act_bits or args.layer_bits:
            quantize_(model, _quant_config(args))
        passes = 1
    score = audit(model, rule=args.rule or "lab4", passes=passes)
    print(json.dumps(score.to_dict(), indent=2) if args.json else score_text(score.to_dict()))
    return 0


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        weight_bits=args.weight_bits or 32,
        act_bits=args.act_bits or 32,
        first_last_bits=args.first_last_bits,
        layer_bits=_parse_layer_bits(args.layer_bits),
    )


def cmd_train(args: argparse.Namespace) -> int:
    data_config = DataConfig(args.data, val_size=args.val_size, seed=args.seed)
    settings = _parse_kv(args.set, "--set")
    teacher = None
    if args.teacher:
        teacher, teacher_metas = load_models(args.teacher)
        for path, meta in zip(args.teacher, teacher_metas, strict=True):
            check_held_out(path, meta, data_config, "--teacher")
        settings.setdefault("distill", 0.9)
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        tta=args.tta,
        recipe=args.recipe,
        precision=args.precision,
        compile=args.compile,
        **settings,
    )
    if train_config.distill and teacher is None:
        raise ValueError("--set distill needs --teacher MODEL.pt")
    start = None
    if args.init:
        start, start_meta = load_model(args.init)
        check_held_out(args.init, start_meta, data_config, "--init")
    elif args.model is None:
        raise ValueError("train needs --model NAME, or --init MODEL.pt to continue a saved model's network")
    if args.model is None and args.model_arg:
        raise ValueError("--model-arg needs --model; without it, the network is the --init model's own")
    spec = model_spec(start) if args.model is None else {"name": args.model, "config": {}}
    torch.manual_seed(args.seed)
    model = create_model(spec["name"], **spec["config"], **_parse_kv(args.model_arg, "--model-arg"))
    quant = _quant_config(args) if args.weight_bits or args.act_bits or args.layer_bits else None
    if start is not None:
        # New bits for a quantized model: its weights, quantized afresh at them (progressive quantization,
        # e.g. 4 -> 3 bits, step sizes calibrated again); without, it trains on at its own bits and steps,
        # or with --layer-bits alone, the layers it names at new bits and the others as they were.
        requantize = bool(args.weight_bits or args.act_bits)
        with contextlib.suppress(AttributeError, ValueError):  # a layer missing or of another kind: caught below
            apply_quant_plan_(model, {} if requantize else current_plan(start))
        own = model.state_dict()
        state = {k: v for k, v in start.state_dict().items() if not requantize or k in own}
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in own.items()}:
            raise ValueError(f"--init {args.init} does not have the layers of this --model and --model-arg")
        model.load_state_dict(state)
        train_config = replace(train_config, float_warmup=False)  # trained weights: quantized from epoch 1
        if not requantize and quant is not None:
            requantize_layers_(model, quant.layer_bits)
            quant = None
    if quant is not None:
        quantize_(model, quant)  # all at 32 bits: the float network (of a quantized --init, its float weights)
    started = time.perf_counter()
    data = load_data(data_config)
    _log(f"data {args.data}: {len(data.train)} train / {len(data.val)} validation images")
    device = resolve_device(train_config.device)
    if teacher is not None:
        if len(args.teacher) == 1:
            teacher_acc = teacher_metas[0].get("val_acc", float("nan"))
        else:  # the ensemble's own accuracy
            teacher_acc = evaluate(teacher, data.val, device, precision=train_config.precision).accuracy
        _log(f"teacher {' + '.join(args.teacher)}: validation accuracy {teacher_acc:.2%}")

    def progress(s: EpochStats) -> None:
        eta = s.seconds / s.epoch * (train_config.epochs - s.epoch)
        _log(
            f"epoch {s.epoch}/{train_config.epochs}  loss {s.train_loss:.3f}  train {s.train_acc:.1%}  "
            f"val {s.val_acc:.1%}  {s.images_per_second:.0f} img/s  {s.seconds:.0f}s  eta {eta:.0f}s"
        )

    out = Path(args.out)
    checkpoint = out / "train.ckpt"  # an interrupted run, started again with the same --out, resumes
    if checkpoint.is_file():
        _log(f"resuming from {checkpoint}")
    out.mkdir(parents=True, exist_ok=True)
    history = train(model, data, train_config, progress, print_progress, checkpoint, teacher)
    snap_weights_(model)  # what it runs on: zeros counted as zeros, stored as int8 levels
    result = evaluate(model, data.val, device, train_config.tta, train_config.precision)
    score = audit(model, rule=args.rule, passes=result.passes)
    summary = {
        "val_acc": result.accuracy,
        "passes": result.passes,
        "score": score.score,
        "param_term": score.param_term,
        "ops_term": score.ops_term,
        "rule": score.rule,
        "seconds": time.perf_counter() - started,
        "device": device_name(device),
        "precision": precision_name(resolve_precision(train_config.precision, device)),
        "compile_seconds": sum(h.compile_seconds for h in history),
        "images_per_second": history[-1].images_per_second,  # the last epoch: the steady state
    }
    meta = {
        **summary,
        "model": spec["name"],
        "data": asdict(data_config),
        "train": asdict(train_config),
        "history": [asdict(h) for h in history],
        "teacher": None if teacher is None else {"file": " + ".join(args.teacher), "val_acc": teacher_acc},
        "init": args.init,  # the saved model whose weights it started from, if any
        "version": code_version(),
        "command": " ".join(sys.argv),
    }
    save_model(out / "model.pt", model.cpu(), meta)
    checkpoint.unlink()
    summary["model_file"] = str(out / "model.pt")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"validation accuracy {result.accuracy:.2%}  score {score.score:.4f} ({score.rule})  "
            f"saved {out / 'model.pt'}  in {summary['seconds']:.0f}s"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, metas = load_models(args.checkpoints)  # several: their ensemble (mean logits), scored as all of them
    meta, trained_on = metas[0], metas[0].get("data", {})
    held_out = {(m.get("data", {}).get("val_size", 5000), m.get("data", {}).get("seed", 0)) for m in metas}
    if args.split == "val" and len(held_out) > 1:
        raise ValueError(f"{' and '.join(args.checkpoints)} held out different validation images (val_size, seed)")
    # The validation split is the one the model was selected on (same size and seed).
    val_size = trained_on.get("val_size", 5000) if args.split == "val" else 0
    if args.split == "val" and val_size == 0:
        raise ValueError(f"{args.checkpoints[0]} was trained on every training image: no validation images are left")
    data_config = DataConfig(args.data, val_size=val_size, seed=trained_on.get("seed", 0))
    data = load_data(data_config)
    classes = (model.members[0] if isinstance(model, Ensemble) else model).config.num_classes
    if len(data.classes) != classes:
        raise ValueError(f"{args.data} has {len(data.classes)} classes but the model predicts {classes}")
    split = data.test if args.split == "test" else data.val
    if split is None:
        raise ValueError(f"{args.data} has no test split; use --split val, or a source with test images")
    device = resolve_device(args.device)
    # Quantized layers evaluate exactly in any precision; float layers in bf16 round their outputs. So
    # the default is the precision the file's accuracy was measured in, unless this device emulates it.
    precision = args.precision or meta.get("precision", "auto")
    if args.precision is None and precision == "bf16" and resolve_precision("auto", device) != torch.bfloat16:
        _log(
            f"{args.checkpoints[0]} was measured in bf16, which {device_name(device)} emulates (about 10x "
            "slower): evaluating in fp32, exact for quantized layers (--precision bf16 to insist)"
        )
        precision = "fp32"
    result = evaluate(model, split, device, args.tta, precision)
    score = audit(model.cpu(), rule=meta.get("rule", "lab4"), passes=result.passes)
    summary = {
        "model_file": " + ".join(args.checkpoints),
        "data": args.data,
        "split": args.split,
        "images": result.images,
        "accuracy": result.accuracy,
        "passes": result.passes,
        "rule": score.rule,
        "score": score.score,
        "param_term": score.param_term,
        "ops_term": score.ops_term,
        "precision": precision_name(resolve_precision(precision, device)),
        "device": device_name(device),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        of = f" (the mean logits of {len(metas)} models)" if len(metas) > 1 else ""
        print(
            f"{args.split} accuracy {result.accuracy:.2%}{of} on {result.images:,} images ({result.passes} pass(es))  "
            f"score {score.score:.5f} = params {score.param_term:.5f} + ops {score.ops_term:.5f} ({score.rule})"
        )
    return 0


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers, got {text!r}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    ratios = _ratios(args.ratios)
    check_ratios(ratios)
    if args.sensitivity and args.method != "li":
        raise ValueError("--sensitivity belongs to --method li")
    _, meta = load_model(args.checkpoint)
    trained_on = meta.get("data", {})
    # Hold out the very images the model was validated on, never images it was trained on.
    data_config = DataConfig(args.data, val_size=trained_on.get("val_size", 5000), seed=trained_on.get("seed", 0))
    device = resolve_device(args.device)
    finetune = finetune_config(meta, args.finetune_epochs, args.finetune_lr, str(device), args.precision)
    data = load_data(data_config)
    if trained_on.get("source", args.data) != args.data:
        _log(f"warning: the model was trained on {trained_on['source']}, sweeping on {args.data}")
    tta = meta.get("passes", 1) == 2
    ctx = SweepContext(data, finetune, device, tta, args.precision, rule=meta.get("rule", "lab4"))
    out = Path(args.out)
    check_merge(out, ctx.rule)
    if args.sensitivity:
        ctx.sensitive = li_sensitivity(args.checkpoint, ratios, ctx)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sensitivity.json").write_text(json.dumps(ctx.sensitive, indent=2) + "\n")
        _log(f"sensitivity of {len(ctx.sensitive)} blocks written to {out / 'sensitivity.json'}")

    def save(model: torch.nn.Module, row: dict) -> str:
        path = out / "models" / f"{row['method']}-{row['ratio']:g}.pt"
        inherited = {k: meta[k] for k in ("model", "data", "train", "passes") if k in meta}  # split, recipe
        own = {"precision": precision_name(resolve_precision(args.precision, device)), "device": device_name(device)}
        provenance = {"pruned_from": args.checkpoint, "version": code_version(), "command": " ".join(sys.argv)}
        save_model(path, model, {**inherited, **row, **own, **provenance})
        return str(path)

    rows = run_sweep(args.checkpoint, args.method, ratios, ctx, log=_log, save=save if args.save else None)
    merged = save_rows(out, rows)
    write_html(sweep_figure(merged), out / "sweep.html")
    if args.png:
        export_html(out / "sweep.html", out / "sweep.png", height=500)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{len(rows)} ratios of {args.method} written to {out}/sweep.csv, sweep.json, sweep.html")
    return 0


def _study_worker_args(args: argparse.Namespace) -> list[str]:
    """The options a launched worker inherits from ``launch``."""
    out = []
    for flag, value in (
        ("--storage", args.storage),
        ("--n-trials", args.n_trials),
        ("--timeout", args.timeout),
    ):
        if value is not None:
            out += [flag, str(value)]
    for assignment in _study_overrides(args):
        out += ["--set", assignment]
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from microsearch.search import load_study, run_worker, summary

    study = load_study(args.study, _study_overrides(args))
    optuna_study = run_worker(study, args.storage, args.n_trials, args.timeout, args.worker, log=_log)
    print(summary(optuna_study, study.trial_target))
    return 0


def _check_gpus(gpus: list[str], count: int) -> None:
    """Refuse GPU indices torch does not see: a worker pinned to one would train on the CPU."""
    missing = [g for g in gpus if not (g.isdigit() and int(g) < count)]
    if missing:
        seen = f"the GPUs here are {', '.join(map(str, range(count)))}" if count else "torch sees no GPU here"
        raise ValueError(f"--gpus {','.join(missing)}: no such GPU ({seen})")


def cmd_launch(args: argparse.Namespace) -> int:
    from microsearch.search import launch, load_study

    study = load_study(args.study, _study_overrides(args))
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else None
    _check_gpus(gpus or [], torch.cuda.device_count())
    if args.workers_per_gpu is not None:
        if not gpus:
            raise ValueError("--workers-per-gpu needs --gpus (the GPUs the workers share)")
        if args.workers_per_gpu < 1:
            raise ValueError(f"--workers-per-gpu must be >= 1, got {args.workers_per_gpu}")
        workers = args.workers or args.workers_per_gpu * len(gpus)
        url = args.storage or study.storage_url
        if workers > 1 and url.startswith("sqlite"):
            raise ValueError(
                f"{workers} workers cannot share the SQLite file {url} (one writer at a time): "
                "use --storage journal:PATH (one host) or a PostgreSQL URL"
            )
    else:
        workers = args.workers or (len(gpus) if gpus else 1)
    return launch(study, workers, gpus, args.storage, _study_worker_args(args))


def cmd_pareto(args: argparse.Namespace) -> int:
    from microsearch.search import load_existing, load_study, save_pareto

    study = load_study(args.study, _study_overrides(args))
    path = save_pareto(load_existing(study, args.storage), study, args.out, log=_log)
    print(f"wrote {path}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from microsearch.search import load_study, serve_dashboard

    serve_dashboard(load_study(args.study, _study_overrides(args)), args.storage, args.host, args.port, log=_log)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from microsearch.search import load_existing, load_study, retrain
    from microsearch.search.retrain import retrain_top, test_accuracy

    study = load_study(args.study, _study_overrides(args))
    if args.top is not None:
        if args.trial != "best":
            raise ValueError("--top K chooses among the K best trials itself: leave out --trial")
        card = retrain_top(study, load_existing(study, args.storage), args.out, args.top, args.epochs, log=_log)
    else:
        card = retrain(study, args.out, args.storage, args.trial, args.epochs, log=_log)
    a = card["audit"]
    val = "" if card["val_acc"] is None else f"validation accuracy {card['val_acc']:.2%}, "
    print(
        f"trial {card['trial']}: {val}test accuracy {test_accuracy(card)}\n"
        f"score {a['score']:.5f} ({card['rule']}); wrote {Path(args.out) / 'model.pt'}, model_card.json, model_card.md"
    )
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    from microsearch.search import load_study
    from microsearch.search.campaign import campaign

    study = load_study(args.study, _study_overrides(args))
    summary = campaign(study, args.out, args.hours, args.storage, args.top, args.retrain_epochs, log=_log)
    final = summary["final"]
    test = "not measured (no test split)" if final["test_acc"] is None else f"{final['test_acc']:.2%}"
    outputs = ("final/", "report/", "pareto.html", "summary.json")
    written = [name for name in outputs if (Path(args.out) / name).exists()]
    print(
        f"campaign {study.name}: {summary['trials_finished']} trials; final model trial {final['trial']}: "
        f"validation {final['val_acc']:.2%}, test {test}, score {final['score']:.5f}\n"
        f"wrote in {args.out}: {', '.join(written)}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from microsearch.search import load_existing, load_study, write_report

    study = load_study(args.study, _study_overrides(args))
    html_path, md_path = write_report(
        study,
        load_existing(study, args.storage),
        args.out,
        Path(args.sweeps) if args.sweeps else None,
        Path(args.model) if args.model else None,
    )
    written = [html_path, md_path]
    if args.pdf:
        written.append(export_html(html_path, html_path.with_suffix(".pdf")))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from microsearch.search import load_existing, load_study
    from microsearch.search.run import requeue_interrupted, stale_running

    if args.running_older_than < 0:
        raise ValueError(f"--running-older-than must be >= 0 minutes, got {args.running_older_than}")
    study = load_study(args.study, _study_overrides(args))
    optuna_study = load_existing(study, args.storage)
    stale = stale_running(optuna_study, args.running_older_than)
    for trial in stale:
        requeue_interrupted(optuna_study, trial.number)
    numbers = ", ".join(str(t.number) for t in stale) or "none"
    print(f"requeued trials RUNNING for more than {args.running_older_than:g} min: {numbers}")
    return 0


def _add_speed_args(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--precision and --compile; on study commands (default None) they override the study file."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="training precision (auto: bf16 where the hardware runs it natively, else fp32)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE,
        default=default,
        help="torch.compile the training step (auto: on runs long enough to repay it)",
    )


def _study_overrides(args: argparse.Namespace) -> list[str]:
    """The --set assignments, plus --precision / --compile where the command has them."""
    speed = [f"{k}={getattr(args, k)}" for k in ("precision", "compile") if getattr(args, k, None)]
    return [*args.set, *speed]


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study file, e.g. studies/smoke.toml")
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite beside the study file); journal:PATH for a journal file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a study-file value, e.g. budget.epochs=2 (repeatable)",
    )


def _build_search(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    _add_speed_args(p, default=None)
    p.add_argument("--n-trials", type=int, help="trials for this worker (default: [budget] trials)")
    p.add_argument("--timeout", type=float, help="seconds for this worker (default: [budget] timeout)")
    p.add_argument("--worker", type=int, default=0, help="worker index (its tag in the log)")


def _build_launch(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    _add_speed_args(p, default=None)
    p.add_argument("--workers", type=int, help="local worker processes (default: one per GPU, or one)")
    p.add_argument("--gpus", help="comma-separated GPU ids, one worker per GPU in turn, e.g. 0,1,2,3")
    p.add_argument(
        "--workers-per-gpu",
        type=int,
        help="K workers share each listed GPU (small models leave a GPU idle); needs a journal or PostgreSQL storage",
    )
    p.add_argument("--n-trials", type=int, help="trials per worker")
    p.add_argument("--timeout", type=float, help="seconds per worker")


def _build_campaign(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    _add_speed_args(p, default=None)
    p.add_argument("--out", required=True, help="the campaign folder (re-run the same command to resume)")
    p.add_argument("--hours", type=float, help="search time budget (default: the study's trial count only)")
    p.add_argument("--top", type=int, help="best trials retrained as final candidates (default: [retrain] top)")
    p.add_argument(
        "--retrain-epochs",
        type=int,
        help="training epochs of the candidates (default: [retrain] epochs, else a trial's)",
    )


def _build_pareto(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--out", required=True, help="HTML file to write")


def _build_dashboard(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8080)


def _build_retrain(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    _add_speed_args(p, default=None)
    p.add_argument("--trial", default="best", help="'best' (best feasible) or a trial number")
    p.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="retrain the K lowest-score trials that met the trial target, validation images held out, "
        "choose on them, test only the chosen one (candidates in OUT/candidates)",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: [retrain] epochs, else a trial's)")
    p.add_argument("--out", required=True, help="folder for model.pt, model_card.json, model_card.md")


def _build_requeue(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument(
        "--running-older-than",
        type=float,
        required=True,
        metavar="MIN",
        help="trials RUNNING for more than MIN minutes are marked failed and queued again",
    )


def _build_report(p: argparse.ArgumentParser) -> None:
    _add_study_args(p)
    p.add_argument("--out", required=True, help="folder for report.html and report.md")
    p.add_argument("--sweeps", help="a folder written by `microsearch sweep`, to include")
    p.add_argument("--model", help="a folder written by `microsearch retrain`, to include its card")
    p.add_argument("--pdf", action="store_true", help="also print the report to report.pdf (needs Chromium)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list_models(), help="registered model name")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="model config override, e.g. width=8 or blocks=2,2,2 (repeatable)",
    )
    p.add_argument("--weight-bits", type=int, help="quantize conv/linear weights to B bits (1-8, 16, 32)")
    p.add_argument("--act-bits", type=int, help="quantize layer inputs to B bits (2-8, 16, 32)")
    p.add_argument(
        "--first-last-bits", type=int, help="weights and inputs of the stem and the classifier (default: the same)"
    )
    p.add_argument(
        "--layer-bits",
        action="append",
        default=[],
        metavar="NAME=W/A",
        help="weight and input bits of one layer or of every layer under a module, e.g. stages.2=3/3 "
        "(repeatable; the most specific name wins; names as `microsearch score` lists them)",
    )


def _build_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a model.pt written by microsearch")
    _add_model_args(p)
    p.add_argument("--rule", choices=list(RULES), help="score accounting rule (default: the file's, else lab4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _build_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="cifar10 | imagefolder:PATH | synthetic[:N]")
    _add_model_args(p)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for model.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="default: the recipe's (baseline 256, fast 128)")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (2 passes, scored)")
    _add_speed_args(p)
    p.add_argument("--recipe", choices=list(RECIPES), default="baseline", help="training recipe")
    p.add_argument(
        "--teacher",
        metavar="MODEL.pt",
        action="append",
        help="distil from this trained model (loss weight 0.9 unless --set distill=W; --set temperature=T; "
        "--set teacher_tta=True: soft labels from its mean logits on the image and its mirror); given "
        "more than once, from the mean logits of all of them (an ensemble)",
    )
    p.add_argument(
        "--init",
        metavar="MODEL.pt",
        help="start from this saved model's weights (its network, or --model's, which must have the same layers): "
        "a float model is quantized from the first "
        "epoch; a quantized one trains on at its own bits and step sizes, or with --weight-bits/--act-bits its "
        "weights are quantized afresh at those bits (progressive quantization, e.g. 4 -> 3 bits; at 32 and 32: "
        "its float network), or with --layer-bits alone only the layers it names (e.g. stages.2=3/3)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="any other TrainConfig field, e.g. cutout=8 or schedule=cosine",
    )
    p.add_argument("--rule", choices=list(RULES), default="lab4")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


Builder = Callable[[argparse.ArgumentParser], None]
Runner = Callable[[argparse.Namespace], int]


def _build_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="MODEL.pt",
        help="a model.pt written by microsearch; several: their ensemble (mean logits, e.g. a teacher to be), "
        "scored as all of them",
    )
    p.add_argument("--data", required=True, help="cifar10 | imagefolder:PATH | synthetic[:N]")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which images (default: test)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (2 passes, both scored)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="evaluation precision (default: the one the file's accuracy was measured in, else auto)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _build_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model.pt written by microsearch train")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--ratios", required=True, help="comma-separated, e.g. 0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--data", required=True, help="the source the model was trained on")
    p.add_argument("--out", required=True, help="folder for sweep.csv, sweep.json, sweep.html")
    p.add_argument("--finetune-epochs", type=int, default=0, help="retraining epochs after pruning")
    p.add_argument("--finetune-lr", type=float, default=0.02, help="peak learning rate when retraining")
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="li only: run Li et al.'s per-block analysis first and skip sensitive blocks",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--png", action="store_true", help="also write sweep.png, the figure as an image (needs Chromium)")
    p.add_argument(
        "--save",
        action="store_true",
        help="write each pruned model as OUT/models/METHOD-RATIO.pt (e.g. for train --init)",
    )
    _add_speed_args(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


COMMANDS: dict[str, tuple[str, Builder, Runner]] = {
    "score": ("audit a model's compression score layer by layer", _build_score, cmd_score),
    "train": ("train a model and save DIR/model.pt", _build_train, cmd_train),
    "evaluate": ("accuracy of a saved model on a split, with the score of its passes", _build_evaluate, cmd_evaluate),
    "sweep": ("accuracy and score of a saved model pruned at several ratios", _build_sweep, cmd_sweep),
    "search": ("run one search worker on a study", _build_search, cmd_search),
    "launch": ("start several local search workers on a study", _build_launch, cmd_launch),
    "pareto": ("plot a study's accuracy vs score with the target line", _build_pareto, cmd_pareto),
    "dashboard": ("serve optuna-dashboard on a study", _build_dashboard, cmd_dashboard),
    "retrain": (
        "retrain a trial (or choose among the K best) into a final model, test it once, write its card",
        _build_retrain,
        cmd_retrain,
    ),
    "report": ("write the study report (HTML and markdown)", _build_report, cmd_report),
    "requeue": (
        "mark trials left RUNNING by a killed worker failed and queue them again",
        _build_requeue,
        cmd_requeue,
    ),
    "campaign": (
        "search, retrain the best trials, choose, test once, report: resumable",
        _build_campaign,
        cmd_campaign,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microsearch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"microsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, build, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        build(p)
        p.set_defaults(run=run)
    return parser


def _stop(signum: int, frame) -> None:
    STOP.set()  # the training loop also checks this, in case the interrupt below is swallowed
    raise KeyboardInterrupt


def _quiet_interrupts(unraisable) -> None:
    """A Ctrl-C or SIGTERM that lands in a finalizer (torch's weak-reference callbacks) is the
    interrupt already reported in one line, not an error worth a traceback."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"microsearch: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code_version()  # cached now: results name the commit this process loaded, not a later checkout's
    STOP.clear()
    sys.unraisablehook = _quiet_interrupts
    warnings.formatwarning = _one_line_warning
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM (what schedulers and containers send) both stop cleanly.
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as e:  # user errors: bad input, files, storage
        print(f"microsearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"microsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
