"""Table keys: everything that changes one unit's cost, so two units with the same key cost the same.

A key stands for a unit of `spec_units` (stem, bneck, last conv, classifier) at its input resolution, and can
build that unit alone for timing. Keys are cheap: `spec_keys` builds no module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from ..model.build import build_unit
from ..model.counts import unit_params
from ..spec.arch import ArchSpec, BlockConfig, default_residual, se_width
from ..spec.units import BneckUnit, ClassifierUnit, LastConvUnit, StemUnit, Unit, spec_units

KINDS = ("stem", "bneck", "last_conv", "classifier")


@dataclass(frozen=True, order=True)
class BlockKey:
    """Everything that changes one unit's cost (a unit of `spec_units`). Unused fields are 0 / False / "".

    stem: in=3, out, kernel, stride, nl. bneck: all fields. last_conv: in, out, nl (1x1).
    classifier (pool + Linear in->exp, nl, Linear exp->out): in = last conv width, exp = hidden, out = classes.
    `resolution` is the unit's input height = width. `residual` (bneck only) is whether the block adds its
    input; None when constructing means the paper's rule (stride 1 and in == out) and is resolved at once.
    The id names `residual` only where it departs from the rule, so ids of tables written before the flag
    existed stay valid.
    """

    kind: str
    resolution: int
    in_channels: int
    exp: int
    out: int
    kernel: int
    stride: int
    se: bool
    nl: str
    expand: bool
    residual: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.residual is None:
            object.__setattr__(self, "residual", self._rule_residual)
        elif self.residual is True and not self._rule_residual:
            raise ValueError(f"residual needs a bneck with stride 1 and in == out, not {self.id}")

    @property
    def _rule_residual(self) -> bool:
        return self.kind == "bneck" and default_residual(self.stride, self.in_channels, self.out)

    @property
    def id(self) -> str:
        flag = "" if self.residual == self._rule_residual else f" res{int(bool(self.residual))}"
        return (f"{self.kind} r{self.resolution} in{self.in_channels} exp{self.exp} out{self.out} "
                f"k{self.kernel} s{self.stride} se{int(self.se)} {self.nl} x{int(self.expand)}{flag}")

    @staticmethod
    def of(unit: Unit) -> "BlockKey":
        """The key of one unit of `spec_units`."""
        if isinstance(unit, StemUnit):
            return BlockKey("stem", unit.resolution, unit.in_channels, 0, unit.out_channels, unit.kernel,
                            unit.stride, False, unit.nl, False, False)
        if isinstance(unit, BneckUnit):
            c = unit.config
            return BlockKey("bneck", unit.resolution, c.in_channels, c.exp, c.out, c.kernel, c.stride, c.se, c.nl,
                            c.expand_conv, c.residual)
        if isinstance(unit, LastConvUnit):
            return BlockKey("last_conv", unit.resolution, unit.in_channels, 0, unit.out_channels, 1, 1, False,
                            unit.nl, False, False)
        if isinstance(unit, ClassifierUnit):
            return BlockKey("classifier", unit.resolution, unit.in_channels, unit.hidden, unit.out_channels, 0, 0,
                            False, unit.nl, False, False)
        raise TypeError(f"not a unit: {unit!r}")

    def unit(self) -> Unit:
        """The unit this key stands for (index 0 and dropout 0.2: neither changes the cost)."""
        if self.kind == "stem":
            return StemUnit(self.resolution, self.out, self.kernel, self.stride, self.nl, self.in_channels)
        if self.kind == "bneck":
            return BneckUnit(self.resolution, BlockConfig(
                index=0, in_channels=self.in_channels, kernel=self.kernel, exp=self.exp, out=self.out, se=self.se,
                nl=self.nl, stride=self.stride, expand_conv=self.expand, se_channels=se_width(self.exp),
                residual=bool(self.residual)))
        if self.kind == "last_conv":
            return LastConvUnit(self.resolution, self.in_channels, self.out, self.nl, index=0)
        if self.kind == "classifier":
            return ClassifierUnit(self.resolution, self.in_channels, self.exp, self.out, self.nl, dropout=0.2)
        raise ValueError(f"unknown block kind {self.kind!r}")

    def module(self) -> nn.Module:
        """A freshly constructed module for this unit alone (weights do not change latency)."""
        return build_unit(self.unit())

    @property
    def params(self) -> int:
        """Parameter count of `module()`, by the counts' arithmetic (cheap: `predict` sums it per spec)."""
        return unit_params(self.unit())

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.resolution, self.resolution)


def spec_keys(spec: ArchSpec) -> list[tuple[str, BlockKey]]:
    """(label, key) of every unit of `spec`, in order: stem, bneck 1..n, last_conv, classifier.

    Labels match the profile table's block names. Cheap: no module is built.
    """
    return [(unit.label, BlockKey.of(unit)) for unit in spec_units(spec)]


def keys_of(specs: Iterable[ArchSpec]) -> list[BlockKey]:
    """The keys of every unit of `specs`, each once, in order of first appearance."""
    seen: dict[BlockKey, None] = {}
    for spec in specs:
        for _, key in spec_keys(spec):
            seen.setdefault(key, None)
    return list(seen)
