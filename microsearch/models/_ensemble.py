"""Several trained networks as one teacher: the mean of their logits.

An ensemble of differently built networks is more accurate than any of them, which makes it a
stronger distillation teacher than one more network of the same kind trained as long. It is a
teacher only: never compressed, saved or scored.
"""

from collections.abc import Sequence

import torch
from torch import nn


class Ensemble(nn.Module):
    """``Ensemble([a, b])(x)`` is ``(a(x) + b(x)) / 2``, in float32."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        classes = {m.config.num_classes for m in members}
        if len(members) < 2 or len(classes) != 1:
            raise ValueError(f"an ensemble needs two or more models of the same classes, got {len(members)}: {classes}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.members]).mean(0)
