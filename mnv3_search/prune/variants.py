"""Channel variants of a spec, built from NetAdapt's own proposal groups (no weights).

The latency table is handed what these make: `netadapt_keys` (from `single_axis_variants`) are the entries
NetAdapt will ask for, `calibration_companions` the networks a calibration is fitted on, and `variant_specs`
(from `random_variant`) the networks a check compares predictions with. All go through
`groups.proposal_groups` and `surgery.child_spec`, so they obey exactly the rules surgery obeys:
coupled residual sets shrink together, an expansion conv is kept (or stays absent), and a residual add is
kept (or stays absent: a stride-1 block whose widths become equal says `residual: false`).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator

from .groups import find_group, proposal_groups
from ..latency.keys import BlockKey, keys_of
from ..spec.arch import ArchSpec
from .surgery import child_spec

# the first companions shrink every group alike, to these shares of the seed's channels; the rest are random
UNIFORM_COMPANIONS = (0.5, 0.25)
COMPANIONS = 8  # networks a calibration is fitted on beside the seed


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


def netadapt_keys(spec: ArchSpec, step: int = 8) -> list[BlockKey]:
    """The entries NetAdapt's first step asks for: the seed's blocks and every single-axis shrink of it
    (each block's exp, each coupled out group, the last conv and the hidden width) in steps of `step`."""
    return keys_of([spec, *single_axis_variants(spec, step)])


def variant_specs(spec: ArchSpec, n: int, seed: int = 0, step: int = 8) -> list[ArchSpec]:
    """`n` random channel variants of `spec` (multiples of `step`), reproducible by seed; they keep the seed's
    name, so the seed's calibration predicts them."""
    rng = random.Random(seed)
    return [replace(random_variant(spec, rng, step), name=spec.name) for _ in range(n)]


def calibration_companions(spec: ArchSpec, n: int = COMPANIONS, step: int = 8) -> list[ArchSpec]:
    """`n` networks the calibration is fitted on beside the seed: uniform shrinks (`UNIFORM_COMPANIONS`), so the
    fit sees networks as small as low budgets reach (random variants keep most groups: 60-90 % of the seed),
    then random variants."""
    uniform = [replace(uniform_variant(spec, f, step), name=spec.name) for f in UNIFORM_COMPANIONS[:n]]
    return uniform + variant_specs(spec, n - len(uniform), seed=-1, step=step)
