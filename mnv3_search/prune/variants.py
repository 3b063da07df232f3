"""Channel variants of a spec, built from NetAdapt's own proposal groups (no weights).

The lookup table uses `single_axis_variants` to know which entries NetAdapt will ask for, and
`random_variant` to make test networks for checking predictions. Both go through
`groups.proposal_groups` and `surgery.child_spec`, so they obey exactly the rules surgery obeys:
coupled residual sets shrink together, an expansion conv is kept (or stays absent), and a residual add is
kept (or stays absent: a stride-1 block whose widths become equal says `residual: false`).
"""

from __future__ import annotations

import random
from typing import Iterator

from .groups import find_group, proposal_groups
from ..spec.arch import ArchSpec
from .surgery import child_spec


def single_axis_variants(spec: ArchSpec, step: int = 8) -> Iterator[ArchSpec]:
    """Each group shrunk alone to every width it may take: the children of NetAdapt's first step."""
    spec = spec.scaled()
    for group in proposal_groups(spec, step):
        for keep in group.keep_options():
            yield child_spec(spec, group, keep, step)


def random_variant(spec: ArchSpec, rng: random.Random, step: int = 8, keep: float = 0.4,
                   min_fraction: float = 0.3) -> ArchSpec:
    """A random child: each group kept with probability `keep`, else shrunk to a width drawn uniformly from
    its allowed widths at or above `min_fraction` of the seed's."""
    child = spec.scaled()
    for seed_group in proposal_groups(child, step):
        if rng.random() < keep:
            continue
        group = find_group(child, seed_group.name, step)  # as this child has it (find_group checks)
        options = [k for k in group.keep_options() if k >= min_fraction * seed_group.channels]
        if options:
            child = child_spec(child, group, rng.choice(options), step)
    return child


def uniform_variant(spec: ArchSpec, fraction: float, step: int = 8) -> ArchSpec:
    """Every group shrunk to the allowed width nearest `fraction` of the seed's: a small network of the seed's
    own depth, so a calibration fitted with it spans the sizes NetAdapt reaches at low budgets."""
    child = spec.scaled()
    for seed_group in proposal_groups(child, step):
        group = find_group(child, seed_group.name, step)
        keep = min([*group.keep_options(), group.channels], key=lambda k: (abs(k - fraction * seed_group.channels), k))
        if keep != group.channels:
            child = child_spec(child, group, keep, step)
    return child
