"""Channel variants of a spec: the widths NetAdapt shrinks, as spec-to-spec functions (no weights).

The axes follow the MobileNetV3 paper's NetAdapt proposals: the expansion size of one block, the output
channels of a residual-coupled group (the producer of a width plus every residual block that adds to it,
the stem included), the last 1x1 conv and the classifier's hidden width. The lookup table uses them to know
which entries NetAdapt will ask for; `random_variant` makes test networks for checking predictions.

The expansion conv's presence is kept as in the seed: a block that had one keeps it even when exp shrinks
to its input width (expand=True), and a block without one (exp == in) keeps exp equal to its input.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

from .spec import ArchSpec, validate_spec


@dataclass(frozen=True)
class Axis:
    """One shrinkable width. kind: exp (block `blocks[0]`), out (group `blocks`, 0 = stem), last_conv, hidden."""

    kind: str
    blocks: tuple[int, ...]
    channels: int

    @property
    def label(self) -> str:
        if self.kind == "exp":
            return f"exp of bneck {self.blocks[0]}"
        if self.kind == "out":
            names = ["stem" if b == 0 else str(b) for b in self.blocks]
            return f"out of {'+'.join(names)}"
        return self.kind


def _has_expand(spec: ArchSpec) -> list[bool]:
    return [c.expand_conv for c in spec.block_configs()]


def axes(spec: ArchSpec) -> list[Axis]:
    """Every width NetAdapt may shrink in `spec` (at width 1.0)."""
    spec = spec.scaled()
    result: list[Axis] = []
    configs = list(spec.block_configs())
    for c in configs:
        if c.expand_conv:
            result.append(Axis("exp", (c.index,), c.exp))
    group = [0]
    width = spec.stem.out
    for c in configs:
        if c.residual:
            group.append(c.index)
        else:
            result.append(Axis("out", tuple(group), width))
            group, width = [c.index], c.out
    result.append(Axis("out", tuple(group), width))
    result.append(Axis("last_conv", (), spec.last_conv))
    result.append(Axis("hidden", (), spec.hidden))
    return result


def _rebuild(seed: ArchSpec, stem_out: int, outs: Sequence[int], exps: Sequence[int], last_conv: int,
             hidden: int, expand: Sequence[bool]) -> ArchSpec:
    """A spec with the given widths, keeping each block's expansion conv present or absent as in the seed."""
    blocks = []
    in_channels = stem_out
    for block, out, exp, has_expand in zip(seed.blocks, outs, exps, expand):
        if not has_expand:
            exp, flag = in_channels, (None if block.expand is None else False)
        else:
            flag = True if exp == in_channels else None
        blocks.append(replace(block, exp=exp, out=out, expand=flag))
        in_channels = out
    return replace(seed, stem=replace(seed.stem, out=stem_out), blocks=tuple(blocks), last_conv=last_conv,
                   hidden=hidden)


def with_widths(spec: ArchSpec, changes: dict[Axis, int]) -> ArchSpec:
    """Apply new channel counts to several axes at once; returns a validated spec at width 1.0."""
    seed = spec.scaled()
    expand = _has_expand(seed)
    stem_out = seed.stem.out
    outs = [b.out for b in seed.blocks]
    exps = [b.exp for b in seed.blocks]
    last_conv, hidden = seed.last_conv, seed.hidden
    for axis, value in changes.items():
        if value < 1:
            raise ValueError(f"{axis.label}: {value} channels")
        if axis.kind == "exp":
            exps[axis.blocks[0] - 1] = value
        elif axis.kind == "out":
            for b in axis.blocks:
                if b == 0:
                    stem_out = value
                else:
                    outs[b - 1] = value
        elif axis.kind == "last_conv":
            last_conv = value
        elif axis.kind == "hidden":
            hidden = value
        else:
            raise ValueError(f"unknown axis kind {axis.kind!r}")
    child = _rebuild(seed, stem_out, outs, exps, last_conv, hidden, expand)
    validate_spec(child, f"variant of {spec.name}")
    return child


def keeps_structure(seed: ArchSpec, child: ArchSpec) -> bool:
    """Same residual adds and expansion convs as the seed. A stride-1 block whose out shrinks to its input
    width would silently gain a residual add (the builder adds one whenever in == out): not a pruned seed."""
    pairs = zip(seed.block_configs(), child.block_configs())
    return all(a.residual == b.residual and a.expand_conv == b.expand_conv for a, b in pairs)


def steps(channels: int, step: int = 8) -> list[int]:
    """Smaller widths NetAdapt may choose: channels - step, channels - 2 step, ... down to at least 1."""
    return list(range(channels - step, 0, -step))


def single_axis_variants(spec: ArchSpec, step: int = 8) -> Iterator[ArchSpec]:
    """Each axis shrunk alone, in steps of `step` down to the minimum: the children of NetAdapt's first step."""
    for axis in axes(spec):
        for value in steps(axis.channels, step):
            child = with_widths(spec, {axis: value})
            if keeps_structure(spec, child):
                yield child


def random_variant(spec: ArchSpec, rng: random.Random, step: int = 8, keep: float = 0.4,
                   min_fraction: float = 0.3) -> ArchSpec:
    """A random child: each axis kept with probability `keep`, else shrunk by a multiple of `step` to a width
    drawn uniformly between `min_fraction` of the seed's and the seed's."""
    for _ in range(1000):
        changes: dict[Axis, int] = {}
        for axis in axes(spec):
            if rng.random() < keep:
                continue
            options = [v for v in steps(axis.channels, step) if v >= min_fraction * axis.channels]
            if options:
                changes[axis] = rng.choice(options)
        child = with_widths(spec, changes)
        if keeps_structure(spec, child):
            return child
    raise ValueError(f"no random variant of {spec.name} keeps its residual structure")  # pragma: no cover
