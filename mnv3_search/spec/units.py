"""The one enumeration of a network's units: stem, each bneck, the last 1x1 conv, the classifier head.

Every consumer that walks a network walks this list, so what a unit is (its input size, its channels,
its SE width, whether it adds its input) is decided once: the builder makes one module per unit
(`model.build.build_unit`), the counts sum per-unit arithmetic (`model.counts`), the latency table keys
one entry per unit (`latency.keys.spec_keys`) and the profile prints one row per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from .arch import ArchSpec, BlockConfig


def conv_out_size(size: int, stride: int) -> int:
    """Output height of a k x k conv with padding k // 2 (odd k, as every conv here): ceil(size / stride)."""
    return (size + stride - 1) // stride


@dataclass(frozen=True)
class StemUnit:
    """k x k conv, stride s, in -> out channels, BN, NL (`features.0`)."""

    kind: ClassVar[str] = "stem"
    resolution: int  # input height = width
    out_channels: int
    kernel: int
    stride: int
    nl: str
    in_channels: int = 3

    @property
    def label(self) -> str:
        return "stem"

    @property
    def out_resolution(self) -> int:
        return conv_out_size(self.resolution, self.stride)


@dataclass(frozen=True)
class BneckUnit:
    """One bneck row, resolved (`features.{index}`)."""

    kind: ClassVar[str] = "bneck"
    resolution: int
    config: BlockConfig

    @property
    def label(self) -> str:
        return f"bneck {self.config.index}"

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out

    @property
    def kernel(self) -> int:
        return self.config.kernel

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def nl(self) -> str:
        return self.config.nl

    @property
    def out_resolution(self) -> int:
        return conv_out_size(self.resolution, self.config.stride)


@dataclass(frozen=True)
class LastConvUnit:
    """The 1x1 conv after the last bneck, BN, NL (`features.{index}`, index = number of bnecks + 1)."""

    kind: ClassVar[str] = "last_conv"
    resolution: int
    in_channels: int
    out_channels: int
    nl: str
    index: int
    kernel: ClassVar[int] = 1
    stride: ClassVar[int] = 1

    @property
    def label(self) -> str:
        return "last_conv"

    @property
    def out_resolution(self) -> int:
        return self.resolution


@dataclass(frozen=True)
class ClassifierUnit:
    """Global pool -> Linear in -> hidden, NL, Dropout -> Linear hidden -> classes (`avgpool`, `classifier`).

    `resolution` is the feature map the pool reads; the output is a vector of `out_channels` logits.
    """

    kind: ClassVar[str] = "classifier"
    resolution: int
    in_channels: int
    hidden: int
    out_channels: int
    nl: str
    dropout: float

    @property
    def label(self) -> str:
        return "classifier"

    @property
    def out_resolution(self) -> int:
        return 1


Unit = Union[StemUnit, BneckUnit, LastConvUnit, ClassifierUnit]


def spec_units(spec: ArchSpec) -> list[Unit]:
    """The units of the concrete (width-scaled) network in forward order: stem, bneck 1..n, last_conv,
    classifier. Cheap: arithmetic only, no module is built."""
    concrete = spec.scaled()
    stem = concrete.stem
    units: list[Unit] = [StemUnit(concrete.resolution, stem.out, stem.kernel, stem.stride, stem.nl)]
    size = units[0].out_resolution
    for config in concrete.block_configs():
        unit = BneckUnit(size, config)
        units.append(unit)
        size = unit.out_resolution
    units.append(LastConvUnit(size, concrete.blocks[-1].out, concrete.last_conv, concrete.last_nl,
                              len(concrete.blocks) + 1))
    units.append(ClassifierUnit(size, concrete.last_conv, concrete.hidden, concrete.num_classes, concrete.head_nl,
                                concrete.dropout))
    return units
