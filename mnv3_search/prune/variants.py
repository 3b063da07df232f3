"""Channel variants of a spec, built from NetAdapt's own proposal groups (no weights).

The latency table is handed what these make: `netadapt_keys` (from `single_axis_variants`) are the entries
NetAdapt will ask for, `calibration_companions` the networks a calibration is fitted on, and `variant_specs`
(from `spanning_variant`) the networks a check compares predictions with. All go through
`groups.proposal_groups` and `surgery.child_spec`, so they obey exactly the rules surgery obeys:
coupled residual sets shrink together, an expansion conv is kept (or stays absent), and a residual add is
kept (or stays absent: a stride-1 block whose widths become equal says `residual: false`).

Checks and calibrations span the sizes a search reaches (SPAN: a quarter of the seed's channels to all of
them). Random variants that keep most groups (`random_variant`: 60-90 % of the seed's latency) hid the
table's error on small networks: the per-call cost each entry carries weighs most there.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator

from .groups import find_group, proposal_groups
from ..latency.keys import BlockKey, keys_of
from ..spec.arch import ArchSpec
from .surgery import child_spec

# the shares of the seed's channels that checks and calibrations cover (what budgets of 25-100 % reach)
SPAN = (0.25, 1.0)
# each group's share is the network's share times a factor drawn from this range (capped at the seed's width),
# so a variant is not a uniform shrink: groups differ as they do in a searched network
JITTER = (0.8, 1.2)
# the first companions shrink every group alike, to these shares of the seed's channels; the rest are spanning
# variants. Both ends of SPAN's lower half are pinned: the per-call term is fitted on what small networks show
UNIFORM_COMPANIONS = (0.5, 0.25)
COMPANIONS = 10  # networks a calibration is fitted on beside the seed (8 spanning variants: a steadier fit than 6)
COMPANION_SEED = -1  # the companions' random stream, apart from any check's (`variant_specs` seeds 0, 1, ...)


def single_axis_variants(spec: ArchSpec, step: int = 8) -> Iterator[ArchSpec]:
    """Each group shrunk alone to every width it may take: the children of NetAdapt's first step."""
    spec = spec.scaled()
    for group in proposal_groups(spec, step):
        for keep in group.keep_options():
            yield child_spec(spec, group, keep, step)


def random_variant(spec: ArchSpec, rng: random.Random, step: int = 8, keep: float = 0.4,
                   min_fraction: float = 0.3) -> ArchSpec:
    """A random child: each group kept with probability `keep`, else shrunk to a width drawn uniformly from
    its allowed widths at or above `min_fraction` of the seed's (60-90 % of the seed's latency: a mild cut)."""
    child = spec.scaled()
    for seed_group in proposal_groups(child, step):
        if rng.random() < keep:
            continue
        group = find_group(child, seed_group.name, step)  # as this child has it (find_group checks)
        options = [k for k in group.keep_options() if k >= min_fraction * seed_group.channels]
        if options:
            child = child_spec(child, group, rng.choice(options), step)
    return child


def _shrunk(spec: ArchSpec, shares: dict[str, float], step: int) -> ArchSpec:
    """Every group shrunk to the allowed width nearest its share of the seed's channels (ties: the narrower)."""
    child = spec.scaled()
    for seed_group in proposal_groups(child, step):
        group = find_group(child, seed_group.name, step)
        target = shares[seed_group.name] * seed_group.channels
        keep = min([*group.keep_options(), group.channels], key=lambda k: (abs(k - target), k))
        if keep != group.channels:
            child = child_spec(child, group, keep, step)
    return child


def uniform_variant(spec: ArchSpec, fraction: float, step: int = 8) -> ArchSpec:
    """Every group shrunk to the allowed width nearest `fraction` of the seed's: a small network of the seed's
    own depth, so a calibration fitted with it spans the sizes NetAdapt reaches at low budgets."""
    return _shrunk(spec, {g.name: fraction for g in proposal_groups(spec.scaled(), step)}, step)


def spanning_variant(spec: ArchSpec, fraction: float, rng: random.Random, step: int = 8) -> ArchSpec:
    """A random child near `fraction` of the seed's channels: each group at `fraction` times a factor drawn
    from `JITTER` (at most its seed width), rounded to an allowed width."""
    shares = {g.name: min(1.0, fraction * rng.uniform(*JITTER)) for g in proposal_groups(spec.scaled(), step)}
    return _shrunk(spec, shares, step)


def span_fractions(n: int, rng: random.Random, span: tuple[float, float] = SPAN) -> list[float]:
    """`n` network shares covering `span` evenly: one drawn uniformly inside each of n equal slices, shuffled,
    so 12 variants cover the range as surely as 30 do."""
    if n <= 0:
        return []
    low, high = span
    width = (high - low) / n
    fractions = [low + (i + rng.random()) * width for i in range(n)]
    rng.shuffle(fractions)
    return fractions


def netadapt_keys(spec: ArchSpec, step: int = 8) -> list[BlockKey]:
    """The entries NetAdapt's first step asks for: the seed's blocks and every single-axis shrink of it
    (each block's exp, each coupled out group, the last conv and the hidden width) in steps of `step`."""
    return keys_of([spec, *single_axis_variants(spec, step)])


def variant_specs(spec: ArchSpec, n: int, seed: int = 0, step: int = 8) -> list[ArchSpec]:
    """`n` random channel variants of `spec` spanning `SPAN` of its channels (`spanning_variant` at
    `span_fractions`; multiples of `step`), reproducible by seed; they keep the seed's name, so the seed's
    calibration predicts them."""
    rng = random.Random(seed)
    return [replace(spanning_variant(spec, f, rng, step), name=spec.name) for f in span_fractions(n, rng)]


def calibration_companions(spec: ArchSpec, n: int = COMPANIONS, step: int = 8) -> list[ArchSpec]:
    """`n` networks the calibration is fitted on beside the seed: uniform shrinks (`UNIFORM_COMPANIONS`), so the
    fit sees networks as small as low budgets reach, then spanning variants (`variant_specs`) from a stream of
    their own, so a check's variants are never the networks the calibration was fitted on."""
    uniform = [replace(uniform_variant(spec, f, step), name=spec.name) for f in UNIFORM_COMPANIONS[:n]]
    return uniform + variant_specs(spec, max(0, n - len(uniform)), seed=COMPANION_SEED, step=step)
