"""Model files: everything needed to rebuild a (pruned, quantized) model without the command line.

A file holds the registry name and full config (which fixes the possibly pruned architecture),
the per-layer quantization plan, the dtype, the weights and free-form metadata. Weights that are
exactly their quantized value (``snap_weights_``) are stored as int8 levels, which the step sizes
stored beside them turn back into the same weights bit for bit: a 4-bit model file is about a
third of its float32 size. It loads with ``torch.load(path, weights_only=True)``.
"""

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microsearch.compression import apply_quant_plan_, current_plan, set_weight_levels_, weight_levels
from microsearch.evaluation.data import DataConfig
from microsearch.models import Ensemble, create_model, model_spec

FORMAT = "microsearch-model/1"


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write ``model`` to ``path``; pruning masks must have been made permanent first."""
    masked = [n for n, m in model.named_modules() if hasattr(m, "weight_mask")]
    if masked:
        raise ValueError(f"layers {masked[:3]} still carry pruning masks; make the pruning permanent first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = weight_levels(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in levels}
    blob = {
        "format": FORMAT,
        "model": model_spec(model),
        "quant_plan": current_plan(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "state_dict": state,
        "weight_levels": levels,
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored at ``path``; returns it (in eval mode) and its metadata. A file
    that is damaged or not one of ours fails with one line naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable model file (truncated, or not a torch file): {_first_line(e)}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    missing = [key for key in ("model", "quant_plan", "dtype", "state_dict", "meta") if key not in blob]
    if missing:
        raise ValueError(f"{path}: a damaged {FORMAT} file, missing {missing}")
    try:
        model = _rebuild(blob)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: a damaged {FORMAT} file: {_first_line(e)}") from None
    return model.to(device).eval(), blob["meta"]


def load_models(paths: Sequence[str | Path]) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The saved models at ``paths`` as one network (a teacher): the model itself for one path, the
    ``Ensemble`` of their mean logits for several; and the metadata of each."""
    loaded = [load_model(path) for path in paths]
    models, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    return (models[0] if len(models) == 1 else Ensemble(models).eval()), metas


def check_held_out(path: str | Path, meta: dict[str, Any], data: DataConfig, what: str) -> None:
    """Refuse the saved model at ``path`` (``what`` names where it was given) unless its metadata
    shows it trained on ``data``'s training split: same source, validation size and seed, so that
    it never saw the validation images that select models."""

    def split(d: dict[str, Any]) -> tuple:
        kind, _, where = str(d.get("source", "")).partition(":")
        where = str(Path(where).expanduser().resolve()) if where and kind == "imagefolder" else where
        return f"{kind}:{where}", d.get("val_size"), d.get("seed")

    theirs, ours = split(meta.get("data") or {}), split(asdict(data))
    if theirs != ours or "val_acc" not in meta:
        raise ValueError(
            f"{what} {path} was trained on (source, val_size, seed) = {theirs}, this run "
            f"holds out {ours}: it must not have seen the validation images"
        )


def _rebuild(blob: dict[str, Any]) -> nn.Module:
    spec = blob["model"]
    model = create_model(spec["name"], **spec["config"])
    apply_quant_plan_(model, blob["quant_plan"])
    dtype = getattr(torch, str(blob["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {blob['dtype']!r} is not a floating-point torch dtype")
    model.to(dtype)
    levels = blob.get("weight_levels", {})
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    missing = [k for k in missing if k not in levels]
    if missing or unexpected:
        raise ValueError(
            f"its weights do not fit its model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    set_weight_levels_(model, levels)  # after the step sizes
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
