"""ArchSpec -> torch.nn.Module with torchvision's MobileNetV3 module layout.

The layout (features.0 stem, features.N.block.M sub-layers, SE as fc1/fc2, classifier.0/.3) is kept so
torchvision checkpoints load with strict=True. No I/O and no CLI here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..spec.arch import ArchSpec, BlockConfig
from ..spec.units import BneckUnit, ClassifierUnit, LastConvUnit, StemUnit, Unit, spec_units

BN_EPS = 0.001
BN_MOMENTUM = 0.01


def activation(nl: str) -> Callable[..., nn.Module]:
    return {"RE": nn.ReLU, "HS": nn.Hardswish}[nl]


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BN -> optional activation; children named 0, 1, 2 as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 nl: str | None = None) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if nl is not None:
            layers.append(activation(nl)(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """avgpool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> hard-sigmoid -> scale, as torchvision."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """One bneck: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1 (no activation) [+ input]."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        if config.residual and not (config.stride == 1 and config.in_channels == config.out):
            raise ValueError(f"bneck {config.index}: a residual add needs stride 1 and in == out, got stride "
                             f"{config.stride} and {config.in_channels} -> {config.out}")
        self.config = config
        layers: list[nn.Module] = []
        if config.expand_conv:
            layers.append(ConvBNAct(config.in_channels, config.exp, 1, nl=config.nl))
        layers.append(ConvBNAct(config.exp, config.exp, config.kernel, config.stride, groups=config.exp,
                                nl=config.nl))
        if config.se:
            layers.append(SqueezeExcitation(config.exp, config.se_channels))
        layers.append(ConvBNAct(config.exp, config.out, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = config.residual
        self.out_channels = config.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class Classifier(nn.Module):
    """Global pool -> flatten -> classifier: the head as one unit, for profiling it as a block."""

    def __init__(self, avgpool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def build_unit(unit: Unit) -> nn.Module:
    """A freshly constructed (not initialised) module for one unit; the classifier as a `Classifier`."""
    if isinstance(unit, StemUnit):
        return ConvBNAct(unit.in_channels, unit.out_channels, unit.kernel, unit.stride, nl=unit.nl)
    if isinstance(unit, BneckUnit):
        return InvertedResidual(unit.config)
    if isinstance(unit, LastConvUnit):
        return ConvBNAct(unit.in_channels, unit.out_channels, 1, nl=unit.nl)
    if isinstance(unit, ClassifierUnit):
        return Classifier(nn.AdaptiveAvgPool2d(1), nn.Sequential(
            nn.Linear(unit.in_channels, unit.hidden),
            activation(unit.nl)(inplace=True),
            nn.Dropout(p=unit.dropout, inplace=True),
            nn.Linear(unit.hidden, unit.out_channels),
        ))
    raise TypeError(f"not a unit: {unit!r}")


class MobileNetV3(nn.Module):
    """`features` = stem, bnecks, last conv; then `avgpool` and `classifier`: one module per unit of
    `spec_units(spec)`, named as torchvision names them."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        *body, head_unit = spec_units(spec)
        self.features = nn.Sequential(*(build_unit(unit) for unit in body))
        head = build_unit(head_unit)  # after the features: construction draws from the RNG in the same order
        assert isinstance(head, Classifier)
        self.avgpool = head.avgpool
        self.classifier = head.classifier
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    def head(self) -> Classifier:
        """The pooling + classifier part as a module of its own (shares parameters)."""
        return Classifier(self.avgpool, self.classifier)


def _init_weights(model: nn.Module) -> None:
    """torchvision's init: conv kaiming normal (fan_out), BN 1/0, Linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def build_model(spec: ArchSpec) -> MobileNetV3:
    """Materialize the spec as a freshly initialised PyTorch model."""
    return MobileNetV3(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
