"""Which proposal wins an iteration (and which survive a rung of successive halving): one pure rule.

Score. `ratio` (NetAdapt, MobileNetV3): a proposal that loses accuracy scores dAcc / saving (the accuracy
lost per unit of resource saved, as in the paper); a proposal that keeps or gains accuracy scores its gain
dAcc (>= 0, so above every loss) -- never dAcc / saving, which would prefer the *smaller* saving among
gains. `accuracy`: the holdout accuracy itself. Both scores only grow with accuracy and never fall with the
saving, so a proposal at least as accurate and saving at least as much is never ranked below another.

Ties. A holdout of n images measures an accuracy p to within its binomial standard error sqrt(p(1-p)/n)
(at least one image): `tolerance()`. Differences below that are noise -- on 1,000 Fashion-MNIST images at
76 % it is 1.35 points, and the best proposals of one iteration often sit within it. Every proposal that
would reach the best score with `tolerance` more accuracy ties with the best; among the tied ones the lower
holdout cross-entropy (a finer, steadier signal) wins, then (losses equal within `LOSS_TIE`) the larger
saving, then the group name. Nothing depends on trial numbers or the order proposals finished in.

Ranking repeats the choice on what is left, so a rung of halving keeps exactly the proposals the final
choice would prefer (`survivors`: the best `keep` fraction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

LOSS_TIE = 1e-4  # holdout losses closer than this are equal (float noise between processes, identical nets)


@dataclass(frozen=True)
class Candidate:
    """One proposal's evidence: holdout accuracy and loss (same steps for all), resource after the shrink."""

    group: str
    accuracy: float
    loss: float
    resource: float


@dataclass(frozen=True)
class Ranked:
    """A candidate with the rule's inputs and why it won its place (accuracy, loss, saving or name)."""

    candidate: Candidate
    score: float
    saving: float
    tied: int  # how many candidates (itself included) tied with it when it was chosen
    decided_by: str


def tolerance(parent_accuracy: float, holdout_images: int) -> float:
    """What the holdout resolves around the parent's accuracy: one binomial standard error, at least one
    image. benchmarks/pruner.py (12 iterations): with one image instead, halving and full evaluation picked
    the same proposal in 6 of 12 iterations (the top proposals differ by noise, reordered by a few more
    steps); with this, 8 of 12."""
    n = max(1, holdout_images)
    p = min(max(parent_accuracy, 0.0), 1.0)
    return max(1.0 / n, math.sqrt(p * (1.0 - p) / n))


def score(rule: str, accuracy: float, parent_accuracy: float, saving: float) -> float:
    if rule == "accuracy":
        return accuracy
    gain = accuracy - parent_accuracy
    return gain if gain >= 0 else gain / max(saving, 1e-12)


def rank(candidates: Iterable[Candidate], rule: str, parent_accuracy: float, current: float,
         tolerance: float) -> list[Ranked]:
    """All candidates, best first (see the module doc); `current` is the parent's resource."""
    left = sorted(candidates, key=lambda c: c.group)  # input order never matters
    order: list[Ranked] = []
    eps = 1e-12
    while left:
        scores = {c.group: score(rule, c.accuracy, parent_accuracy, current - c.resource) for c in left}
        best = max(scores.values())
        tied = [c for c in left
                if score(rule, c.accuracy + tolerance + eps, parent_accuracy, current - c.resource) >= best]
        lowest = min(c.loss for c in tied)
        near = [c for c in tied if c.loss - lowest <= LOSS_TIE]
        winner = min(near, key=lambda c: (-(current - c.resource), c.group))
        if len(tied) == 1:
            why = "accuracy"
        elif len(near) == 1:
            why = "loss"
        elif all(c.resource > winner.resource for c in near if c is not winner):
            why = "saving"
        else:
            why = "name"
        order.append(Ranked(winner, scores[winner.group], current - winner.resource, len(tied), why))
        left.remove(winner)
    return order


def survivors(ranked: Sequence[Ranked], keep: float) -> list[Ranked]:
    """The best `keep` fraction of a rung (at least one) goes on to the next: the nearest whole number, a
    half rounded down (so `keep` 0.5 is the better half, n // 2, as runs made before `keep` existed)."""
    return list(ranked[:max(1, math.ceil(keep * len(ranked) - 0.5))])
