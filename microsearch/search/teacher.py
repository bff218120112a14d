"""The distillation teacher of a study: trained once, cached, shared by every worker and the retrain.

The cache key is a hash of everything that shapes the teacher: its model and training settings and
the training images (source, validation split, seed). It lives in the study's artifact folder,
``teachers/<key>/model.pt``, beside its per-epoch checkpoint while it trains; a file lock makes a
second worker on the host wait for the first instead of training its own, and a run stopped while
training the teacher resumes it. The teacher trains on the study's training split only, so the
validation images stay unseen by every model that takes part in model selection.

A saved model (``[distill] teacher_file``, e.g. the ``model.pt`` of ``microsearch train``) is used
as it is, once its card shows it was trained on the same split: same source, validation size and
seed, so that it never saw the study's validation images. Several (``teacher_files``) teach together,
through the mean of their logits; their ensemble's validation accuracy is measured when it is loaded.
The same check holds for ``[distill] init_file``, the float model candidates start from when it is
not the teacher (``start_model``).
"""

import fcntl
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from torch import nn

from microsearch.checkpoint import check_held_out, load_model, load_models, save_model
from microsearch.evaluation.data import Dataset, load_data
from microsearch.evaluation.train import EpochStats, TrainConfig, evaluate, print_progress, resolve_device, train
from microsearch.models import create_model
from microsearch.search.study import StudyConfig


def teacher_config(study: StudyConfig) -> dict:
    """What defines the teacher (the cache key is its hash)."""
    d, config = study.distill, _train_config(study)
    data = {k: v for k, v in asdict(study.data).items() if k != "cache_dir"}
    return {
        "model": d.teacher,
        "args": d.teacher_args,
        "epochs": d.teacher_epochs,
        "recipe": d.teacher_recipe,
        "lr": d.teacher_lr,
        "batch_size": config.batch_size,  # as resolved: a recipe's may change
        "seed": study.seed,
        "data": data,
    }


def _train_config(study: StudyConfig) -> TrainConfig:
    d = study.distill
    return TrainConfig(
        epochs=d.teacher_epochs,
        batch_size=study.budget.batch_size,
        lr=d.teacher_lr,
        recipe=d.teacher_recipe,
        precision=study.precision,
        compile=study.compile,
        seed=study.seed,
        device=study.device,
    )


def teacher_path(study: StudyConfig) -> Path:
    """Where the study's trained teacher is cached (or its one saved teacher is)."""
    if study.distill.teacher_file:
        return Path(study.distill.teacher_file).expanduser()
    key = hashlib.sha256(json.dumps(teacher_config(study), sort_keys=True).encode()).hexdigest()[:16]
    return study.artifacts_dir / "teachers" / key / "model.pt"


def ensure_teacher(
    study: StudyConfig, data: Dataset | None = None, log: Callable[[str], None] = print
) -> tuple[nn.Module, dict] | None:
    """The study's teacher and its metadata (``val_acc`` among them), trained first if no worker
    has yet; None when the study does not distil. ``data``: the study's own split, if loaded."""
    d = study.distill
    if not d.enabled:
        return None
    if d.saved_teachers:
        return _saved_teacher(study, data, log)
    path = teacher_path(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not path.is_file():
            _train_teacher(study, path, data or load_data(study.data), log)
    model, meta = load_model(path)
    log(f"[teacher] {d.teacher} from {path}: validation accuracy {meta['val_acc']:.2%}")
    return model, meta


def _saved_teacher(study: StudyConfig, data: Dataset | None, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    paths = [Path(p).expanduser() for p in study.distill.saved_teachers]
    model, metas = load_models(paths)
    key = "distill.teacher_file" if study.distill.teacher_file else "distill.teacher_files"
    for path, meta in zip(paths, metas, strict=True):
        check_held_out(path, meta, study.data, key)
        log(f"[teacher] {path}: validation accuracy {meta['val_acc']:.2%}")
    if len(paths) == 1:
        return model, metas[0]
    split = (data or load_data(study.data)).val
    accuracy = evaluate(model, split, resolve_device(study.device), precision=study.precision).accuracy
    log(f"[teacher] the mean of their logits: validation accuracy {accuracy:.2%}")
    names = " + ".join(meta.get("model", "saved") for meta in metas)
    members = [{"file": str(path), "val_acc": meta["val_acc"]} for path, meta in zip(paths, metas, strict=True)]
    return model, {"model": f"ensemble ({names})", "val_acc": accuracy, "members": members}


def start_model(study: StudyConfig, teacher: nn.Module | None, log: Callable[[str], None] = print) -> nn.Module | None:
    """The trained float network candidates start from (``[distill] init``): ``init_file`` where
    given, else the teacher; None without ``init``."""
    d = study.distill
    if not d.init or not d.init_file:
        return teacher if d.init else None
    path = Path(d.init_file).expanduser()
    model, meta = load_model(path)
    check_held_out(path, meta, study.data, "distill.init_file")
    log(f"[init] {path}: validation accuracy {meta['val_acc']:.2%}; candidates with its layers start from it")
    return model


def _train_teacher(study: StudyConfig, path: Path, data: Dataset, log: Callable[[str], None]) -> None:
    d = study.distill
    config = _train_config(study)
    checkpoint = path.parent / "train.ckpt"
    log(
        f"[teacher] training {d.teacher} for {d.teacher_epochs} epochs on {len(data.train)} images"
        + (" (resuming)" if checkpoint.is_file() else "")
    )

    def show(s: EpochStats) -> None:
        left = s.seconds / s.epoch * (config.epochs - s.epoch)
        log(f"[teacher] epoch {s.epoch}/{config.epochs}  val {s.val_acc:.1%}  {s.seconds:.0f}s  eta {left:.0f}s")

    model = create_model(d.teacher, **d.teacher_args)
    history = train(model, data, config, on_epoch=show, on_progress=print_progress, checkpoint=checkpoint)
    device = resolve_device(config.device)
    accuracy = evaluate(model, data.val, device, precision=config.precision).accuracy
    meta = {
        "teacher": teacher_config(study),
        "val_acc": accuracy,
        "train": asdict(config),
        "history": [asdict(h) for h in history],
        "seconds": history[-1].seconds,
    }
    save_model(path, model.cpu(), meta)
    checkpoint.unlink()


def teacher_record(study: StudyConfig, meta: dict) -> dict:
    """What the study, the model card and the report say about the teacher."""
    d = study.distill
    trained = meta.get("train", {})
    return {
        "model": d.teacher or meta.get("model", "saved"),
        "args": d.teacher_args if d.teacher else {},
        "epochs": d.teacher_epochs if d.teacher else trained.get("epochs"),
        "val_acc": meta["val_acc"],
        "tta": d.tta,  # soft labels from its mean logits on the image and its mirror
        "file": " + ".join(d.saved_teachers) if d.teacher_files else str(teacher_path(study)),
        **({"members": meta["members"]} if "members" in meta else {}),  # an ensemble's, each with its accuracy
    }
