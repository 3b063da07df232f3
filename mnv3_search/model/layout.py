"""State_dict key names of `build.py`'s layout, per unit and per layer, so surgery never hard-codes indices.

Knowing where each conv and BN sits (features.N.block.M) is build.py's business; this module mirrors it
in one place: each unit of `spec_units` owns the submodules `unit_modules` names, and within a bneck,
a block with an expansion conv has sub-layers [expand, depthwise, SE?, project], one without has
[depthwise, SE?, project].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..spec.arch import ArchSpec, BlockConfig
from ..spec.units import BneckUnit, ClassifierUnit, LastConvUnit, StemUnit, Unit, spec_units

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class BlockKeys:
    """Key prefixes of one bneck's layers. A ConvBNAct prefix P has its conv at P.0, its BN at P.1."""

    expand: Optional[str]
    depthwise: str
    se: Optional[str]
    project: str


def unit_modules(unit: Unit) -> tuple[str, ...]:
    """Names of the model's submodules that make up `unit` (state_dict keys start with them)."""
    if isinstance(unit, StemUnit):
        return (stem_prefix(),)
    if isinstance(unit, BneckUnit):
        return (f"features.{unit.config.index}",)
    if isinstance(unit, LastConvUnit):
        return (f"features.{unit.index}",)
    if isinstance(unit, ClassifierUnit):
        return ("avgpool", "classifier")
    raise TypeError(f"not a unit: {unit!r}")


def stem_prefix() -> str:
    return "features.0"


def last_conv_prefix(spec: ArchSpec) -> str:
    last = spec_units(spec)[-2]
    assert isinstance(last, LastConvUnit)
    return unit_modules(last)[0]


def block_keys(config: BlockConfig) -> BlockKeys:
    base = f"features.{config.index}.block"
    i = 0
    expand = None
    if config.expand_conv:
        expand = f"{base}.{i}"
        i += 1
    depthwise = f"{base}.{i}"
    i += 1
    se = None
    if config.se:
        se = f"{base}.{i}"
        i += 1
    return BlockKeys(expand=expand, depthwise=depthwise, se=se, project=f"{base}.{i}")


HIDDEN_LINEAR = "classifier.0"
OUTPUT_LINEAR = "classifier.3"
