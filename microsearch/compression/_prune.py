"""Unstructured pruning through ``torch.nn.utils.prune``.

Conv and linear layers are found by iterating ``model.modules()``. While masks are on, a layer
holds ``weight_orig`` and ``weight_mask`` and its ``weight`` is their product; ``make_permanent_``
calls ``prune.remove`` to restore a plain ``weight`` that keeps the zeros.

Ratios are cumulative: ``ratio=0.5`` leaves half the weights zero, however many were zero before,
so an iterative schedule is just a rising sequence of ratios.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune


class Criterion(ABC):
    """Importance of each weight: the lowest-scoring weights are pruned first."""

    @abstractmethod
    def __call__(self, weight: torch.Tensor) -> torch.Tensor: ...


class L1(Criterion):
    """Magnitude: |w| (Han et al. 2015)."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs()


class RandomCriterion(Criterion):
    """A seeded random importance: the baseline every criterion must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.gen).to(weight.device)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers of ``model``, by name, in ``model.modules()`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def check_ratio(name: str, ratio: float) -> None:
    """Every pruning method's ratios: the fraction removed, in [0, 1)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio for {name} must be in [0, 1), got {ratio}")


def _scores(module: nn.Module, criterion: Criterion) -> torch.Tensor:
    """Importance of each weight; weights already masked score -1 so they stay pruned."""
    weight = module.weight.detach()
    scores = criterion(weight).float()
    mask = getattr(module, "weight_mask", None)
    return scores if mask is None else torch.where(mask.bool(), scores, torch.full_like(scores, -1.0))


def _apply_keep(modules: list[nn.Module], keep: torch.Tensor) -> None:
    """Mask ``modules`` with ``keep`` (one flat boolean vector over all their weights)."""
    start = 0
    for m in modules:
        n = m.weight.numel()
        mask = keep[start : start + n].view_as(m.weight).to(m.weight.dtype)
        if hasattr(m, "weight_mask"):  # replace rather than stack: the new mask already holds the old
            prune.remove(m, "weight")
        prune.custom_from_mask(m, "weight", mask)
        start += n


def _keep_top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """A boolean vector keeping all but ``round(ratio * n)`` of the lowest scores (exact count)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    n_keep = scores.numel() - round(ratio * scores.numel())
    keep[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = True
    return keep


def prune_global_(model: nn.Module, ratio: float, criterion: Criterion | None = None) -> None:
    """Zero ``ratio`` of all conv and linear weights together, ranked across layers.

    Example: ``prune_global_(model, 0.8)`` (global magnitude pruning).
    """
    check_ratio("the model", ratio)
    criterion = criterion or L1()
    modules = list(prunable_layers(model).values())
    scores = torch.cat([_scores(m, criterion).flatten() for m in modules])
    _apply_keep(modules, _keep_top(scores, ratio))


def prune_layers_(model: nn.Module, ratios: float | dict[str, float], criterion: Criterion | None = None) -> None:
    """Zero a ratio of each layer's weights: one ratio for all, or one per layer name."""
    criterion = criterion or L1()
    layers = prunable_layers(model)
    if not isinstance(ratios, dict):
        ratios = dict.fromkeys(layers, ratios)
    unknown = sorted(set(ratios) - set(layers))
    if unknown:
        raise ValueError(f"no prunable layer named {unknown}; layers: {list(layers)}")
    for name, ratio in ratios.items():
        check_ratio(name, ratio)
        _apply_keep([layers[name]], _keep_top(_scores(layers[name], criterion).flatten(), ratio))


def make_permanent_(model: nn.Module) -> None:
    """Remove the masks, keeping the zeros in a plain ``weight`` (``prune.remove``)."""
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def sparsity(model: nn.Module) -> float:
    """Fraction of conv and linear weights that are zero."""
    weights = [m.weight for m in prunable_layers(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def han_prune_(
    model: nn.Module,
    ratio: float,
    finetune: Callable[[nn.Module], None],
    steps: int = 3,
    criterion: Criterion | None = None,
) -> list[float]:
    """Han et al. 2015: prune, retrain with the masks fixed, repeat up to ``ratio``.

    The ratio rises in ``steps`` equal steps; ``finetune(model)`` retrains after each. Masks stay
    on (call ``make_permanent_`` when done). Returns the ratios applied.
    """
    check_ratio("the model", ratio)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    schedule = [ratio * (k + 1) / steps for k in range(steps)]
    for r in schedule:
        prune_global_(model, r, criterion)
        finetune(model)
    return schedule
