"""Model registry: every model family is built by name from keyword overrides of its config."""

from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet", width=8, blocks=(2, 2, 2))``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    return _MODELS[name](**config)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild ``model``: its registry name and full config."""
    return {"name": model.registry_name, "config": asdict(model.config)}


def config_from_kwargs(cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """Merge ``overrides`` into ``defaults`` and build ``cls``, naming any unknown key."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown}; known: {sorted(known)}")
    return cls(**{**defaults, **overrides})


def same_layers(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` hold the same tensors by name and shape (one can load the other)."""

    def shapes(model: nn.Module) -> dict[str, torch.Size]:
        return {name: t.shape for name, t in model.state_dict().items()}

    return shapes(a) == shapes(b)
