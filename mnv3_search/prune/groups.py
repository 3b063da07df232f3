"""NetAdapt proposal groups of a spec: the channel sets that can shrink on their own.

MobileNetV3 (section 4.2) shrinks (a) the expansion of one block, or (b) a bottleneck shared through
residual adds, all its members at once so the adds still line up. Those coupled sets are found here
from the spec alone (never written by hand): the stem output and block outputs are joined whenever a
block adds its input to its output, and a block with no expansion conv runs its depthwise conv on its
input channels, so its expansion belongs to its input's set. The last 1x1 conv and the classifier's
hidden width are groups of their own.

Only blocks that really add their input couple their output to it: a stride-1 block whose input and
output happen to be equal in width but that has no add (`residual: false`, e.g. after a shrink) leaves
the two sets apart. So every multiple of the step is a width a set may take: when a shrink makes a
stride-1 block's input equal its output, the child says `residual: false` and keeps the parent's structure.

Names are stable while a network shrinks (a shrink never adds or removes a residual add):
`exp4` the expansion of bneck 4, `out4-6` the set produced by bneck 4..6 (`out0-1`: the stem and
bneck 1), `last_conv`, `hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..errors import UserError
from ..spec.arch import ArchSpec, BlockConfig

EXPANSION = "expansion"
COUPLED = "coupled-out"
LAST_CONV = "last_conv"
HIDDEN = "hidden"
KINDS = (EXPANSION, COUPLED, LAST_CONV, HIDDEN)


@dataclass(frozen=True)
class ProposalGroup:
    """One set of channels that shrinks together.

    `producers` are the layers whose output channels are the set: 0 is the stem, i > 0 bneck i's
    projection (coupled-out) or expansion conv (expansion); empty for last_conv and hidden.
    `exp_blocks` are the blocks without expansion conv whose expansion is this set.
    `blocks` are all bneck rows whose weights a shrink of this group slices (producers and consumers).
    """

    name: str
    kind: str
    channels: int
    blocks: tuple[int, ...]
    producers: tuple[int, ...] = ()
    exp_blocks: tuple[int, ...] = ()
    step: int = 8

    def keep_options(self) -> tuple[int, ...]:
        """Widths a shrink may choose, largest first: multiples of `step` below the current width."""
        top = (self.channels - 1) // self.step * self.step
        return tuple(range(top, self.step - 1, -self.step))


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UserError(f"step must be a positive integer number of channels (e.g. 8), got {step!r}")


def coupled_sets(configs: list[BlockConfig]) -> list[list[int]]:
    """Producers (0 = stem, i = bneck i) grouped by residual adds (the blocks' own flags, not their widths);
    each set is a run of consecutive rows."""
    sets: list[list[int]] = [[0]]
    for config in configs:
        if config.residual:
            sets[-1].append(config.index)
        else:
            sets.append([config.index])
    return sets


def _set_name(producers: list[int]) -> str:
    return f"out{producers[0]}" if len(producers) == 1 else f"out{producers[0]}-{producers[-1]}"


def proposal_groups(spec: ArchSpec, step: int = 8) -> list[ProposalGroup]:
    """All proposal groups of the (width-scaled) spec, in network order: expansions and coupled
    outputs interleaved as they occur, then last_conv and hidden."""
    _check_step(step)
    spec = spec.scaled()
    configs = list(spec.block_configs())
    sets = coupled_sets(configs)
    set_of: dict[int, int] = {p: n for n, producers in enumerate(sets) for p in producers}
    widths = [spec.stem.out if producers[0] == 0 else configs[producers[0] - 1].out for producers in sets]

    groups: list[ProposalGroup] = []
    for n, producers in enumerate(sets):
        consumers = [c for c in configs if set_of[c.index - 1] == n]
        exp_blocks = tuple(c.index for c in consumers if not c.expand_conv)
        touched = sorted({p for p in producers if p > 0} | {c.index for c in consumers})
        groups.append(ProposalGroup(
            name=_set_name(producers), kind=COUPLED, channels=widths[n], blocks=tuple(touched),
            producers=tuple(producers), exp_blocks=exp_blocks, step=step,
        ))
        for c in configs:
            if c.expand_conv and set_of[c.index - 1] == n:
                groups.append(ProposalGroup(name=f"exp{c.index}", kind=EXPANSION, channels=c.exp,
                                            blocks=(c.index,), producers=(c.index,), step=step))
    groups.sort(key=_network_order)
    groups.append(ProposalGroup(name=LAST_CONV, kind=LAST_CONV, channels=spec.last_conv, blocks=(), step=step))
    groups.append(ProposalGroup(name=HIDDEN, kind=HIDDEN, channels=spec.hidden, blocks=(), step=step))
    return groups


def _network_order(group: ProposalGroup) -> tuple[int, int]:
    """exp i sits before out i (the expansion is inside block i, its output after it)."""
    first = group.producers[0]
    return (first, 0) if group.kind == EXPANSION else (first, 1)


def find_group(spec: ArchSpec, group: Union[str, ProposalGroup], step: int = 8) -> ProposalGroup:
    """The group of `spec` with this name; a ProposalGroup is looked up again by name and must match."""
    name = group.name if isinstance(group, ProposalGroup) else group
    step = group.step if isinstance(group, ProposalGroup) else step
    groups = proposal_groups(spec, step)
    for candidate in groups:
        if candidate.name == name:
            if isinstance(group, ProposalGroup) and group.channels != candidate.channels:
                raise UserError(
                    f"group {name!r} has {group.channels} channels but spec {spec.name} has {candidate.channels}; "
                    f"the group was taken from another spec: call proposal_groups on this spec"
                )
            return candidate
    raise UserError(
        f"unknown proposal group {name!r} for spec {spec.name}; its groups are: {', '.join(g.name for g in groups)}"
    )
