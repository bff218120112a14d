"""CIFAR ResNets with configurable width, depth, stem and block type (ResNet-20/32/56 and ResNet18).

Besides the classic stride-1 stem and basic blocks: an early-downsampling stem (a stride-2 conv, or
space-to-depth: 2x2 pixel blocks stacked into 12 channels), so every stage runs on 4x fewer
positions; depthwise-separable blocks; and inverted-residual blocks (MobileNetV2's expand ->
depthwise -> project). Every block ends with a ReLU after the residual sum, so the input of every
inner layer is non-negative and its activations quantize unsigned (all 2^b levels used).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.models._registry import config_from_kwargs, register_model

STEMS = {"conv": 1, "stride2": 2, "s2d": 1}  # stem -> stride of its conv
SPACE_TO_DEPTH = 2  # the s2d stem's pixel block side


@dataclass
class ResNetConfig:
    width: int = 16  # channels of the stem and the first stage
    multipliers: tuple[float, ...] = (1, 2, 4)  # stage s has round(width * multipliers[s]) channels
    blocks: tuple[int, ...] = (3, 3, 3)  # residual blocks per stage; stages after the first halve H, W
    block: str = "basic"  # "basic": two 3x3 convs; "dwsep": depthwise-separable; "mbconv": inverted residual
    stem: str = "conv"  # "conv": 3x3 at full resolution; "stride2" or "s2d": the stages start at 16x16
    expansion: int = 1  # a block's inner channels = its width x expansion (before filter pruning)
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
        if min(self.multipliers) <= 0 or min(self.blocks) < 1:
            raise ValueError(f"multipliers {self.multipliers} must be > 0 and blocks {self.blocks} >= 1")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {sorted(STEMS)}, got {self.stem!r}")
        if self.expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {self.expansion}")
        if self.mid_channels is not None and (len(self.mid_channels) != sum(self.blocks) or min(self.mid_channels) < 1):
            raise ValueError(f"mid_channels needs {sum(self.blocks)} entries >= 1, got {self.mid_channels}")

    def stage_channels(self) -> list[int]:
        return [max(1, round(self.width * m)) for m in self.multipliers]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class Subsampled(nn.Sequential):
    """Its layers applied to every ``stride``-th pixel: a strided 1x1 conv as the stride-1 conv of
    the subsampled input (the same products and sums, the same layers and weights). On x86 CPUs
    oneDNN's strided 1x1 weight gradient for channels_last inputs of fewer channels than its block
    (8 with AVX2, 16 with AVX-512) hangs, crashes or returns wrong gradients (oneDNN issue 6035;
    seen here: a 4 -> 8 channel shortcut hung a worker on an AVX2 CPU)."""

    def __init__(self, stride: int, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, :: self.stride, :: self.stride])


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return Subsampled(stride, *_conv_bn(c_in, c_out, 1))


def init_convs_(model: nn.Module) -> None:
    """He initialisation of every conv (fan out, for ReLU networks)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ConvPair(nn.Module):
    """A block whose pruned filters are those of its ``conv1`` (conv first), feeding its ``conv2``:
    filter pruning removes the producer's filters and the consumer's matching input channels."""

    @property
    def producer(self) -> nn.Conv2d:
        return self.conv1[0]

    @property
    def consumer(self) -> nn.Conv2d:
        return self.conv2[0]


class BasicBlock(ConvPair):
    """3x3 conv (c_in -> mid) -> BN -> ReLU -> 3x3 conv (mid -> c_out) -> BN, plus shortcut."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, mid, 3, stride)
        self.conv2 = _conv_bn(mid, c_out, 3)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        return F.relu(out + self.shortcut(x))


class _PointwisePair(nn.Module):
    """A block whose pruned filters are those of its first pointwise conv (``pw1``), feeding its
    last one (``pw2``)."""

    @property
    def producer(self) -> nn.Conv2d:
        return self.pw1[0]

    @property
    def consumer(self) -> nn.Conv2d:
        return self.pw2[0]


class SeparableBlock(_PointwisePair):
    """Depthwise 3x3 -> pointwise (c_in -> mid) -> ReLU -> depthwise 3x3 -> pointwise (mid -> c_out)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.dw1 = _conv_bn(c_in, c_in, 3, stride, groups=c_in)
        self.pw1 = _conv_bn(c_in, mid, 1)
        self.dw2 = _conv_bn(mid, mid, 3, groups=mid)
        self.pw2 = _conv_bn(mid, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.pw1(self.dw1(x)))
        out = self.pw2(self.dw2(out))
        return F.relu(out + self.shortcut(x))


class InvertedBlock(_PointwisePair):
    """Pointwise expand (c_in -> mid) -> ReLU -> depthwise 3x3 (stride) -> ReLU -> pointwise
    project (mid -> c_out), plus shortcut (MobileNetV2's inverted residual, ReLU after the sum)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pw1 = _conv_bn(c_in, mid, 1)
        self.dw = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.pw2 = _conv_bn(mid, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.dw(F.relu(self.pw1(x))))
        return F.relu(self.pw2(out) + self.shortcut(x))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "dwsep": SeparableBlock, "mbconv": InvertedBlock}


class ResNet(nn.Module):
    registry_name = "resnet"  # every variant is rebuilt from its full config under this name

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.stage_channels()
        default_mids = [c * config.expansion for c, n in zip(channels, config.blocks) for _ in range(n)]
        mids = iter(config.mid_channels or default_mids)
        stem_in = 3 * SPACE_TO_DEPTH**2 if config.stem == "s2d" else 3
        self.stem = _conv_bn(stem_in, config.width, 3, STEMS[config.stem])
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
        init_convs_(self)

    def prunable_blocks(self) -> dict[str, nn.Module]:
        """The residual blocks by name, in ``config.mid_channels`` order."""
        return {f"stages.{s}.{b}": block for s, stage in enumerate(self.stages) for b, block in enumerate(stage)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.stem == "s2d":
            x = F.pixel_unshuffle(x, SPACE_TO_DEPTH)
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
