"""What an iteration chooses among: proposals, each a name plus the cuts that make it from the parent.

A `Proposal` is a value: `cuts` maps each group it shrinks to the channels it keeps. NetAdapt's own proposals
(`OneGroupProposals`) cut one group each, as far as the iteration's goal needs; a source of other proposals
is another `ProposalSource` beside it (`KnapsackProposal`: `--method hybrid`'s cut of several groups at once),
and the loop, the successive halving and the ledger take its proposals as they come, keyed by name.

In the study a one-group proposal's trials carry fixed params (group, channels) (`trial_cut`): the encoding
every run folder's study holds, which a resumed run and the ledger read back. A proposal of several cuts
carries its name as the group param and its cuts in a user attr (CUTS_ATTR), read back by `trial_cuts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol

import torch
from optuna.trial import FrozenTrial

from ..prune.groups import ProposalGroup, proposal_groups
from ..prune.importance import Importance
from ..prune.knapsack import KnapsackProblem, widths_of, width_options
from ..prune.surgery import child_spec
from ..spec.arch import ArchSpec
from .attrs import CHANNELS_PARAM, CUTS_ATTR, FIXED_PARAMS_ATTR
from .pricing import Pricing
from .study import trial_group


@dataclass(frozen=True)
class Parent:
    """The network an iteration starts from: what a proposal source may look at (shape, weights, figures)."""

    spec: ArchSpec
    state: dict[str, torch.Tensor]
    resource: float
    accuracy: float
    checkpoint: str  # relative to the run folder, as workers find it


@dataclass(frozen=True)
class Proposal:
    """One candidate network of an iteration. `name` is unique within the iteration (its trials and its
    proposals.csv row go by it); `cuts` maps each group it shrinks to the channels kept, `before` to the
    channels the parent has; `spec` and `resource` are the child and its figure in the budget's unit."""

    name: str
    kind: str
    cuts: Mapping[str, int]
    before: Mapping[str, int]
    spec: ArchSpec
    resource: float

    @classmethod
    def one_group(cls, group: ProposalGroup, channels: int, spec: ArchSpec, resource: float) -> "Proposal":
        """NetAdapt's proposal: `group` (and its name) cut to `channels`."""
        return cls(group.name, group.kind, {group.name: channels}, {group.name: group.channels}, spec, resource)

    @property
    def cuts_one_group(self) -> bool:
        """NetAdapt's kind: one cut, of the group the proposal is named after."""
        return list(self.cuts) == [self.name]

    @property
    def channels_before(self) -> Optional[int]:
        """The group's width in the parent, for a one-group proposal (iterations.csv, proposals.csv)."""
        return next(iter(self.before.values())) if len(self.before) == 1 else None


def label(cuts: Mapping[str, int]) -> str:
    """How iterations.csv's `proposal` column names a choice: `exp8=72`."""
    return ",".join(f"{group}={channels}" for group, channels in cuts.items())


def trial_cut(proposal: Proposal) -> tuple[str, Optional[int]]:
    """The (group, channels) params of a proposal's trials; a proposal of several cuts has its name and no
    channels (its cuts go in the trials' user attrs: `cuts_attrs`)."""
    if proposal.cuts_one_group:
        return proposal.name, proposal.cuts[proposal.name]
    return proposal.name, None


def cuts_attrs(proposal: Proposal) -> dict[str, Any]:
    """The user attrs that carry a proposal of several cuts (none for a one-group proposal)."""
    return {} if proposal.cuts_one_group else {CUTS_ATTR: dict(proposal.cuts)}


def attr_cuts(attrs: Mapping[str, Any]) -> Optional[dict[str, int]]:
    """A proposal of several cuts as its trial's user attrs carry it (`cuts_attrs`); None for a one-group one."""
    several = attrs.get(CUTS_ATTR)
    return None if several is None else {str(group): int(channels) for group, channels in several.items()}


def trial_channels(t: FrozenTrial) -> Optional[int]:
    """The channels a trial's proposal keeps, also while it never ran (params fixed, not yet suggested)."""
    return t.params.get(CHANNELS_PARAM, t.system_attrs.get(FIXED_PARAMS_ATTR, {}).get(CHANNELS_PARAM))


def trial_cuts(t: FrozenTrial) -> dict[str, int]:
    """The cuts of a trial's proposal, read back from its params and attrs (`trial_cut`, `cuts_attrs` wrote
    them); empty if it has none."""
    several = attr_cuts(t.user_attrs)
    if several is not None:
        return several
    group, channels = trial_group(t), trial_channels(t)
    return {} if group is None or channels is None else {str(group): int(channels)}


class ProposalSource(Protocol):
    """Makes an iteration's proposals from its parent, each meant to meet `goal` (in the budget's unit).
    `names`: the names its proposals take (the trials' group param ranges over them and the seed's groups)."""

    names: tuple[str, ...]

    def propose(self, parent: Parent, goal: float) -> list[Proposal]: ...


class OneGroupProposals:
    """NetAdapt's proposals: per group, the largest width whose child meets the goal by the pricing (binary
    search over the group's widths, as the figure falls monotonically with width; batched, so the latency
    table measures its missing entries together)."""

    def __init__(self, pricing: Pricing, step: int) -> None:
        self.pricing = pricing
        self.step = step

    def shrinkable(self, spec: ArchSpec) -> list[ProposalGroup]:
        """The groups of `spec` that have a smaller width to offer."""
        return [g for g in proposal_groups(spec, self.step) if g.keep_options()]

    def propose(self, parent: Parent, goal: float) -> list[Proposal]:
        spec, resource = parent.spec, self.pricing.resource
        groups = self.shrinkable(spec)
        options = {g.name: g.keep_options() for g in groups}  # largest first
        children: dict[tuple[str, int], ArchSpec] = {}

        def child(g: ProposalGroup, i: int) -> ArchSpec:
            key = (g.name, i)
            if key not in children:
                children[key] = child_spec(spec, g, options[g.name][i], self.step)
            return children[key]

        # lo: best index known to meet the goal; hi: smallest index known to miss it
        self.pricing.prefetch([child(g, len(options[g.name]) - 1) for g in groups])
        bounds: dict[str, list[int]] = {}
        for g in groups:
            last = len(options[g.name]) - 1
            if resource(child(g, last)) <= goal:
                bounds[g.name] = [last, -1]
        active = [g for g in groups if g.name in bounds]
        while True:
            probes = [(g, (bounds[g.name][0] + bounds[g.name][1]) // 2) for g in active
                      if bounds[g.name][0] - bounds[g.name][1] > 1]
            if not probes:
                break
            self.pricing.prefetch([child(g, i) for g, i in probes])
            for g, i in probes:
                if resource(child(g, i)) <= goal:
                    bounds[g.name][0] = i
                else:
                    bounds[g.name][1] = i
        found = []
        for g in active:
            i = bounds[g.name][0]
            found.append(Proposal.one_group(g, options[g.name][i], child(g, i), resource(child(g, i))))
        return found


KNAPSACK_PROPOSAL = "knapsack"  # the name (and kind) of --method hybrid's proposal; no group is called that
HYBRID_OPTIONS = 8  # widths priced per group and iteration (the one-shot knapsack prices 16 once)


class KnapsackProposal:
    """`--method hybrid`'s extra proposal: HALP's knapsack (prune/knapsack.py) over every group of the parent,
    sized to the iteration's goal, which cuts several groups at once where NetAdapt's proposals cut one each.
    The channels are valued by `importance` on the parent, the estimator the evaluator keeps channels by, so
    the cut that is evaluated keeps what the knapsack valued. No proposal when the knapsack cuts one group
    only: NetAdapt's proposal for that group is the widest of it that meets the goal, as good or better."""

    names: tuple[str, ...] = (KNAPSACK_PROPOSAL,)

    def __init__(self, pricing: Pricing, step: int, importance: Importance,
                 max_options: int = HYBRID_OPTIONS) -> None:
        self.pricing = pricing
        self.step = step
        self.importance = importance
        self.max_options = max_options

    def propose(self, parent: Parent, goal: float) -> list[Proposal]:
        groups = proposal_groups(parent.spec, self.step)
        scores = self.importance(parent.spec, parent.state, groups)
        self.pricing.prefetch([child_spec(parent.spec, g, k, self.step) for g in groups
                               for k in width_options(g, self.max_options)[1:]])
        problem = KnapsackProblem.build(parent.spec, scores, self.pricing.resource, self.max_options)
        try:
            shape, resource = problem.shape_for(goal)
        except ValueError:  # every group at its smallest width misses the goal
            return []
        cuts = {g.name: width for g, width in zip(groups, widths_of(shape, groups)) if width != g.channels}
        if len(cuts) < 2:
            return []
        before = {g.name: g.channels for g in groups if g.name in cuts}
        return [Proposal(KNAPSACK_PROPOSAL, KNAPSACK_PROPOSAL, cuts, before, shape, resource)]
