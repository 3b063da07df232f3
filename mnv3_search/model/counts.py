"""Params and MAdds of a spec by arithmetic, without building or tracing a model.

NetAdapt compares hundreds of candidate children per iteration when the budget is in MACs or params;
tracing each with fvcore would take seconds. These formulas give the same conv + linear multiply-adds as
fvcore (the tests check equality on the shipped specs) in microseconds.
"""

from __future__ import annotations

from ..spec.arch import ArchSpec


def _conv_out(size: int, kernel: int, stride: int) -> int:
    padding = (kernel - 1) // 2
    return (size + 2 * padding - kernel) // stride + 1


def spec_macs(spec: ArchSpec) -> int:
    """Multiply-adds of every convolution and linear layer for one image at the spec's resolution."""
    concrete = spec.scaled()
    stem = concrete.stem
    size = _conv_out(spec.resolution, stem.kernel, stem.stride)
    total = size * size * stem.out * 3 * stem.kernel * stem.kernel
    for c in spec.block_configs():
        if c.expand_conv:
            total += size * size * c.in_channels * c.exp
        size = _conv_out(size, c.kernel, c.stride)
        total += size * size * c.exp * c.kernel * c.kernel
        if c.se:
            total += 2 * c.exp * c.se_channels
        total += size * size * c.exp * c.out
    last_in = concrete.blocks[-1].out
    total += size * size * last_in * concrete.last_conv
    total += concrete.last_conv * concrete.hidden + concrete.hidden * concrete.num_classes
    return total


def spec_params(spec: ArchSpec) -> int:
    """Trainable parameters of build_model(spec) (BN scale and shift included, running stats not)."""
    concrete = spec.scaled()
    stem = concrete.stem
    total = 3 * stem.out * stem.kernel * stem.kernel + 2 * stem.out
    for c in spec.block_configs():
        if c.expand_conv:
            total += c.in_channels * c.exp + 2 * c.exp
        total += c.exp * c.kernel * c.kernel + 2 * c.exp
        if c.se:
            total += c.exp * c.se_channels + c.se_channels + c.se_channels * c.exp + c.exp
        total += c.exp * c.out + 2 * c.out
    last_in = concrete.blocks[-1].out
    total += last_in * concrete.last_conv + 2 * concrete.last_conv
    total += (concrete.last_conv + 1) * concrete.hidden + (concrete.hidden + 1) * concrete.num_classes
    return total
