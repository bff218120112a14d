"""A wide, shallow plain CNN of conv groups, shaped like the fastest public CIFAR-10 trainers
(Jordan's airbench, arXiv 2404.00498: 94% in about 10 epochs).

A 3x3 stem, then groups of [3x3 conv -> 2x2 max-pool -> BN -> ReLU -> 3x3 conv -> BN -> ReLU], each
halving H and W, then a global max-pool and a linear layer. Pooling before the BatchNorm runs the
norm and the group's second conv on 4x fewer positions. Few, large matrix products train fast on
CPUs and GPUs alike: a teacher of other layers that is quick to train. Every group prunes like a
residual block (the first conv's filters and the second conv's matching inputs), and every inner
layer's input follows a ReLU (unsigned activations), so the family quantizes and filter-prunes as
ResNets do.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.models._registry import config_from_kwargs, register_model
from microsearch.models._resnet import ConvPair, init_convs_


@dataclass
class ConvNetConfig:
    widths: tuple[int, ...] = (64, 256, 256)  # output channels of each group; each group halves H, W
    stem: int = 32  # channels of the 3x3 stem conv, at full resolution
    num_classes: int = 10
    # Channels of each group's first conv, in order (filter pruning shrinks them); None: its width.
    mid_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        if self.mid_channels is not None:
            self.mid_channels = tuple(self.mid_channels)
        if not self.widths or min(self.widths) < 1 or self.stem < 1:
            raise ValueError(f"widths {self.widths} and stem {self.stem} need channels >= 1")
        if self.mid_channels is not None and (len(self.mid_channels) != len(self.widths) or min(self.mid_channels) < 1):
            raise ValueError(f"mid_channels needs {len(self.widths)} entries >= 1, got {self.mid_channels}")


class ConvGroup(ConvPair):
    """3x3 conv (c_in -> mid) -> 2x2 max-pool -> BN -> ReLU -> 3x3 conv (mid -> c_out) -> BN -> ReLU."""

    def __init__(self, c_in: int, mid: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class ConvNet(nn.Module):
    registry_name = "convnet"

    def __init__(self, config: ConvNetConfig) -> None:
        super().__init__()
        self.config = config
        mids = config.mid_channels or config.widths
        self.stem = nn.Sequential(nn.Conv2d(3, config.stem, 3, padding=1, bias=False), nn.BatchNorm2d(config.stem))
        c_in, groups = config.stem, []
        for mid, c_out in zip(mids, config.widths):
            groups.append(ConvGroup(c_in, mid, c_out))
            c_in = c_out
        self.groups = nn.Sequential(*groups)
        self.fc = nn.Linear(c_in, config.num_classes)
        init_convs_(self)

    def prunable_blocks(self) -> dict[str, nn.Module]:
        """The conv groups by name, in ``config.mid_channels`` order."""
        return {f"groups.{g}": group for g, group in enumerate(self.groups)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.relu(self.stem(x)))
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


@register_model
def convnet(**overrides: Any) -> ConvNet:
    """Plain CNN of conv groups (default 32 -> 64 -> 256 -> 256 channels); any field overridable."""
    return ConvNet(config_from_kwargs(ConvNetConfig, {}, overrides))
