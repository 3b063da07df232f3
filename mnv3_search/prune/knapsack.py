"""HALP-style shapes (Shen et al., NeurIPS 2022): every channel scored once, the most important ones kept by a
knapsack under the budget, in one shot from the trained seed.

NetAdapt spends most of its time on short fine-tunes that rank one group's cut at a time. HALP instead
scores every channel once (an importance estimator, prune/importance.py: Taylor by default, as HALP), prices
every width of every group with the same resource function NetAdapt uses (latency table, MACs or
parameters), and keeps the channels with the largest total importance whose resource meets the budget: a
multiple-choice knapsack, one width per group.

A group's price is linearised around the seed (the group cut alone); the chosen shape's resource is then
computed exactly (every group at its width together) and the knapsack's capacity moved until that exact
figure meets the target (`knapsack_shape`). `netadapt/knapsack_search.py` (`--method knapsack`) adds what a table
cannot: the shape is timed beside the seed and the target corrected until the measurement meets the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..spec.arch import ArchSpec
from .groups import ProposalGroup, find_group
from .importance import GroupScores
from .surgery import StateDict, child_spec, shrink

MAX_OPTIONS = 16  # widths priced per group below its full width: every table entry is a measurement


def width_options(group: ProposalGroup, max_options: int = MAX_OPTIONS) -> list[int]:
    """The widths the knapsack may give `group`, full width first: its allowed widths (multiples of the step),
    thinned evenly to `max_options` (the smallest always kept), so a 960-channel expansion costs 16 table
    entries, not 119."""
    allowed = list(group.keep_options())
    if len(allowed) > max_options:
        picks = np.linspace(0, len(allowed) - 1, max_options).round().astype(int)
        allowed = [allowed[i] for i in sorted(set(picks.tolist()))]
    return [group.channels, *allowed]


def solve_multiple_choice(costs: Sequence[np.ndarray], values: Sequence[np.ndarray], capacity: float,
                          bins: int = 2000) -> list[int]:
    """Multiple-choice knapsack by dynamic programming: one option per group, total cost <= capacity, the
    largest total value. Costs (>= 0) are discretised into `bins` units of capacity, rounded up, so the
    chosen set never exceeds the capacity. Raises ValueError when no choice fits."""
    unit = capacity / bins if capacity > 0 else 1.0
    if capacity <= 0:  # only options that cost nothing fit
        bins = 0
    best = np.full(bins + 1, -np.inf)
    best[0] = 0.0
    choice: list[np.ndarray] = []
    steps_per_group: list[np.ndarray] = []
    for cost, value in zip(costs, values):
        steps = np.ceil(np.maximum(np.asarray(cost, dtype=float), 0.0) / unit - 1e-9).astype(int)
        steps_per_group.append(steps)
        new = np.full(bins + 1, -np.inf)
        arg = np.full(bins + 1, -1)
        for option, (c, v) in enumerate(zip(steps, value)):
            if c > bins:
                continue
            shifted = np.full(bins + 1, -np.inf)
            shifted[c:] = best[:bins + 1 - c] + v
            better = shifted > new
            new[better], arg[better] = shifted[better], option
        best = new
        choice.append(arg)
    if not np.isfinite(best).any():
        raise ValueError(f"no choice fits a capacity of {capacity:g}")
    at = int(np.argmax(best))
    picks: list[int] = []
    for steps, arg in zip(reversed(steps_per_group), reversed(choice)):
        option = int(arg[at])
        picks.append(option)
        at -= int(steps[option])
    return picks[::-1]


def _combine(seed: ArchSpec, scores: Sequence[GroupScores], widths: Sequence[int]) -> ArchSpec:
    spec = seed
    for s, width in zip(scores, widths):
        if width != s.group.channels:
            spec = child_spec(spec, s.group.name, width, s.group.step)
    return spec


@dataclass(frozen=True)
class KnapsackProblem:
    """Everything about the seed's widths that does not depend on the target, priced once: each group's width
    options (full width first), their linearised price above the group's cheapest width and their kept
    importance, and the cheapest shape. A search that tries several targets (the loop's timed rounds) builds it
    once instead of pricing the same options every round (Small at 224 px: ~180 table predictions, 0.2 s)."""

    seed: ArchSpec
    scores: tuple[GroupScores, ...]
    price: Callable[[ArchSpec], float]
    seed_price: float
    options: tuple[list[int], ...]
    kept_cost: tuple[np.ndarray, ...]  # price kept per option above the group's cheapest width, >= 0
    values: tuple[np.ndarray, ...]
    cheapest: ArchSpec  # every group at its smallest width
    cheapest_price: float

    @classmethod
    def build(cls, seed: ArchSpec, scores: Sequence[GroupScores], price: Callable[[ArchSpec], float],
              max_options: int = MAX_OPTIONS) -> "KnapsackProblem":
        seed_price = price(seed)
        options = tuple(width_options(s.group, max_options) for s in scores)
        deltas = [np.array([price(child_spec(seed, s.group.name, k, s.group.step)) - seed_price
                            if k != s.group.channels else 0.0 for k in widths]) for s, widths in zip(scores, options)]
        values = tuple(np.array([s.kept_importance(k) for k in widths]) for s, widths in zip(scores, options))
        cheapest = _combine(seed, scores, [widths[-1] for widths in options])
        return cls(seed, tuple(scores), price, seed_price, options, tuple(d - d.min() for d in deltas), values,
                   cheapest, price(cheapest))

    def shape_for(self, target: float, rounds: int = 24, bins: int = 2000) -> tuple[ArchSpec, float]:
        """The shape keeping the most importance whose exact price meets `target`: one width per group from a
        knapsack over the linearised prices, its capacity moved until the combined shape's exact price meets
        the target within 0.5 % of the seed's. Cuts interact (a narrower block output also narrows the next
        block's input), so the linearised capacity is only a start: each round steps it by the exact miss (at
        least one knapsack unit, so the choice changes), bisecting once a step leaves the bracket of capacities
        known to meet / miss the target. Returns the shape and its price; raises ValueError when even the
        cheapest shape (every group at its smallest width) misses the target."""
        if self.cheapest_price > target:
            raise ValueError(f"no shape meets {target:g}: every group at its smallest width is "
                             f"{self.cheapest_price:g}")
        kept_cost = self.kept_cost
        top = float(sum(c.max() for c in kept_cost))  # every group at full width
        floor = self.seed_price - top  # the linearised price of the cheapest shape
        capacity = min(max(target - floor, 0.0), top)
        unit = max(top, 1e-12) / bins
        feasible, infeasible = 0.0, top + unit  # capacity 0 is every group at its cheapest width: it meets the target
        best: tuple[ArchSpec, float] = (self.cheapest, self.cheapest_price)
        for _ in range(rounds):
            picks = solve_multiple_choice(kept_cost, self.values, capacity, bins=max(1, round(capacity / unit)))
            spec = _combine(self.seed, self.scores, [widths[p] for widths, p in zip(self.options, picks)])
            exact = self.price(spec)
            used = float(sum(c[p] for c, p in zip(kept_cost, picks)))  # the choice's linearised cost (<= capacity)
            if exact <= target:
                feasible = max(feasible, capacity)
                if exact > best[1]:
                    best = (spec, exact)
                if target - exact < 0.005 * self.seed_price:
                    break
                capacity = max(capacity, used) + max(target - exact, unit)
            else:
                infeasible = min(infeasible, used)  # any capacity >= used may choose this shape again
                capacity = used - max(exact - target, unit)
            if not feasible < capacity < infeasible:  # the step left the bracket: bisect
                capacity = (feasible + infeasible) / 2
            if infeasible - feasible < unit:
                break
        return best


def knapsack_shape(seed: ArchSpec, scores: Sequence[GroupScores], price: Callable[[ArchSpec], float],
                   target: float, max_options: int = MAX_OPTIONS) -> tuple[ArchSpec, float]:
    """One target's shape and price (`KnapsackProblem.shape_for`); build the problem once to try several."""
    return KnapsackProblem.build(seed, scores, price, max_options).shape_for(target)


def widths_of(spec: ArchSpec, groups: Sequence[ProposalGroup]) -> list[int]:
    """Each seed group's width in `spec` (a shape made from the seed by shrinks of those groups)."""
    return [find_group(spec, g.name, g.step).channels for g in groups]


def shrink_to(seed: ArchSpec, state: Mapping[str, torch.Tensor], scores: Sequence[GroupScores],
              shape: ArchSpec) -> StateDict:
    """The seed's weights cut to `shape`, keeping in every group the channels with the largest importance
    (what the knapsack valued), so a fine-tune starts from the channels it chose."""
    spec, sd = seed, dict(state)
    for s, width in zip(scores, widths_of(shape, [s.group for s in scores])):
        if width != s.group.channels:
            spec, sd = shrink(spec, sd, s.group.name, width, s.group.step, torch.from_numpy(s.importance))
    return sd
