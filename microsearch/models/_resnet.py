"""CIFAR ResNets with configurable width, depth and block type (ResNet-20/32/56 and ResNet18)."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.models._registry import config_from_kwargs, register_model


@dataclass
class ResNetConfig:
    width: int = 16  # channels of the stem and the first stage
    multipliers: tuple[int, ...] = (1, 2, 4)  # stage s has width * multipliers[s] channels
    blocks: tuple[int, ...] = (3, 3, 3)  # residual blocks per stage; stages after the first halve H, W
    block: str = "basic"  # "basic": two 3x3 convs; "dwsep": depthwise-separable convs
    num_classes: int = 10
    # Inner channels of each block, in order (filter pruning shrinks them); None: the block's width.
    mid_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.multipliers = tuple(self.multipliers)
        self.blocks = tuple(self.blocks)
        if self.mid_channels is not None:
            self.mid_channels = tuple(self.mid_channels)
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if len(self.multipliers) != len(self.blocks) or not self.blocks:
            raise ValueError(f"multipliers {self.multipliers} and blocks {self.blocks} need one entry per stage")
        if min(self.multipliers) < 1 or min(self.blocks) < 1:
            raise ValueError(f"multipliers {self.multipliers} and blocks {self.blocks} must be >= 1")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        if self.mid_channels is not None and (len(self.mid_channels) != sum(self.blocks) or min(self.mid_channels) < 1):
            raise ValueError(f"mid_channels needs {sum(self.blocks)} entries >= 1, got {self.mid_channels}")

    def stage_channels(self) -> list[int]:
        return [self.width * m for m in self.multipliers]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 and c_in == c_out else _conv_bn(c_in, c_out, 1, stride)


class BasicBlock(nn.Module):
    """3x3 conv (c_in -> mid) -> BN -> ReLU -> 3x3 conv (mid -> c_out) -> BN, plus shortcut."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, mid, 3, stride)
        self.conv2 = _conv_bn(mid, c_out, 3)
        self.shortcut = _shortcut(c_in, c_out, stride)

    # Filter pruning removes the producer's filters and the consumer's matching input channels.
    @property
    def producer(self) -> nn.Conv2d:
        return self.conv1[0]

    @property
    def consumer(self) -> nn.Conv2d:
        return self.conv2[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        return F.relu(out + self.shortcut(x))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 -> pointwise (c_in -> mid) -> ReLU -> depthwise 3x3 -> pointwise (mid -> c_out)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.dw1 = _conv_bn(c_in, c_in, 3, stride, groups=c_in)
        self.pw1 = _conv_bn(c_in, mid, 1)
        self.dw2 = _conv_bn(mid, mid, 3, groups=mid)
        self.pw2 = _conv_bn(mid, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)

    @property
    def producer(self) -> nn.Conv2d:
        return self.pw1[0]

    @property
    def consumer(self) -> nn.Conv2d:
        return self.pw2[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.pw1(self.dw1(x)))
        out = self.pw2(self.dw2(out))
        return F.relu(out + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "dwsep": SeparableBlock}


class ResNet(nn.Module):
    registry_name = "resnet"  # every variant is rebuilt from its full config under this name

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.stage_channels()
        mids = iter(config.mid_channels or [c for c, n in zip(channels, config.blocks) for _ in range(n)])
        self.stem = _conv_bn(3, config.width, 3)
        block = BLOCKS[config.block]
        stages, c_in = [], config.width
        for s, (c_out, n) in enumerate(zip(channels, config.blocks)):
            layers = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                layers.append(block(c_in, next(mids), c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def prunable_blocks(self) -> dict[str, nn.Module]:
        """The residual blocks by name, in ``config.mid_channels`` order."""
        return {f"stages.{s}.{b}": block for s, stage in enumerate(self.stages) for b, block in enumerate(stage)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


_PRESETS: dict[str, dict[str, Any]] = {
    "resnet": {},  # ResNet-20
    "resnet20": {},
    "resnet32": {"blocks": (5, 5, 5)},
    "resnet56": {"blocks": (9, 9, 9)},
    "resnet18": {"width": 64, "multipliers": (1, 2, 4, 8), "blocks": (2, 2, 2, 2)},
}


def _preset(name: str):
    def build(**overrides: Any) -> ResNet:
        return ResNet(config_from_kwargs(ResNetConfig, _PRESETS[name], overrides))

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet, preset {name!r} ({_PRESETS[name] or 'ResNet-20'}); any field overridable."
    return register_model(build)


for _name in _PRESETS:
    _preset(_name)
