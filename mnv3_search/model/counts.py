"""Params and MAdds of a spec by arithmetic, without building or tracing a model.

NetAdapt compares hundreds of candidate children per iteration when the budget is in MACs or params;
tracing each with fvcore would take seconds. These formulas give the same conv + linear multiply-adds as
fvcore (the tests check equality on the shipped specs and per unit) in microseconds. They are written per
unit of `spec_units`, so the latency table's keys use the same arithmetic for one block alone.
A residual add is neither a parameter nor a multiply-add: it changes neither figure.
"""

from __future__ import annotations

from ..spec.arch import ArchSpec
from ..spec.units import BneckUnit, ClassifierUnit, LastConvUnit, StemUnit, Unit, spec_units


def unit_params(unit: Unit) -> int:
    """Trainable parameters of `build_unit(unit)` (BN scale and shift included, running stats not)."""
    if isinstance(unit, StemUnit):
        return unit.in_channels * unit.out_channels * unit.kernel * unit.kernel + 2 * unit.out_channels
    if isinstance(unit, BneckUnit):
        c = unit.config
        total = (c.in_channels * c.exp + 2 * c.exp) if c.expand_conv else 0
        total += c.exp * c.kernel * c.kernel + 2 * c.exp
        if c.se:
            total += c.exp * c.se_channels + c.se_channels + c.se_channels * c.exp + c.exp
        return total + c.exp * c.out + 2 * c.out
    if isinstance(unit, LastConvUnit):
        return unit.in_channels * unit.out_channels + 2 * unit.out_channels
    if isinstance(unit, ClassifierUnit):
        return (unit.in_channels + 1) * unit.hidden + (unit.hidden + 1) * unit.out_channels
    raise TypeError(f"not a unit: {unit!r}")


def unit_macs(unit: Unit) -> int:
    """Multiply-adds of the unit's convolutions and linear layers for one image."""
    if isinstance(unit, StemUnit):
        size = unit.out_resolution
        return size * size * unit.out_channels * unit.in_channels * unit.kernel * unit.kernel
    if isinstance(unit, BneckUnit):
        c, size_in, size = unit.config, unit.resolution, unit.out_resolution
        total = size_in * size_in * c.in_channels * c.exp if c.expand_conv else 0
        total += size * size * c.exp * c.kernel * c.kernel
        if c.se:
            total += 2 * c.exp * c.se_channels
        return total + size * size * c.exp * c.out
    if isinstance(unit, LastConvUnit):
        return unit.resolution * unit.resolution * unit.in_channels * unit.out_channels
    if isinstance(unit, ClassifierUnit):
        return unit.in_channels * unit.hidden + unit.hidden * unit.out_channels
    raise TypeError(f"not a unit: {unit!r}")


def spec_macs(spec: ArchSpec) -> int:
    """Multiply-adds of every convolution and linear layer for one image at the spec's resolution."""
    return sum(unit_macs(unit) for unit in spec_units(spec))


def spec_params(spec: ArchSpec) -> int:
    """Trainable parameters of build_model(spec) (BN scale and shift included, running stats not)."""
    return sum(unit_params(unit) for unit in spec_units(spec))
