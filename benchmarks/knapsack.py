"""HALP-style shapes (Shen et al., NeurIPS 2022): channels ranked globally by Taylor importance, kept by a
knapsack under the latency table's budget, in one shot from the trained seed.

NetAdapt spends most of its time on short fine-tunes that rank one group's cut at a time. HALP instead
scores every channel once (first-order Taylor importance of its BatchNorm scale and shift, accumulated over
batches: Molchanov et al. 2019), prices every width of every group with the same latency table, and keeps
the set of channels with the largest total importance whose predicted latency meets the budget (a
multiple-choice knapsack: one width per group). Used by `benchmarks/netadapt.py --parts knapsack`, which
retrains each shape from scratch like the widths and NetAdapt's shapes, to answer issue 9's item 5: does
a latency-saliency knapsack find better shapes than NetAdapt's per-group proposals?

The latency of a group's width is linearised around the seed (each group alone, from the table entries
NetAdapt's first iteration already measured); the chosen shape's latency is then predicted exactly (every
group at its width together) and the knapsack's capacity is tightened until that prediction meets the
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mnv3_search import build_model, proposal_groups
from mnv3_search.data import Dataset, batches
from mnv3_search.latency.table import LatencyTable
from mnv3_search.prune.groups import ProposalGroup
from mnv3_search.prune.surgery import child_spec, plan_shrink
from mnv3_search.spec.arch import ArchSpec


@dataclass(frozen=True)
class GroupScores:
    """Per-channel importance of one group, largest first (what a width of k keeps: the k first)."""

    group: ProposalGroup
    importance: np.ndarray  # sorted descending

    def kept_importance(self, keep: int) -> float:
        return float(self.importance[:keep].sum())


def _group_tensors(spec: ArchSpec, state: Mapping[str, torch.Tensor], group: ProposalGroup) -> list[tuple[str, int]]:
    """(tensor, channel dim) pairs whose slices are this group's channels; BatchNorm scale and shift where the
    group has them (HALP's Taylor score), else the producing layer's outputs (the classifier's hidden units)."""
    plan = plan_shrink(spec, state, group, group.channels, group.step)
    own = [(s.key, s.dim) for s in plan.slices if s.index is plan.kept]
    bn = [(k, d) for k, d in own if k.endswith(".1.weight") or k.endswith(".1.bias")]
    return bn or [(k, d) for k, d in own if d == 0]


def taylor_importance(spec: ArchSpec, state: Mapping[str, torch.Tensor], ds: Dataset, groups: Sequence[ProposalGroup],
                      num_batches: int = 32, batch_size: int = 64) -> list[GroupScores]:
    """First-order Taylor importance per channel: mean over batches of (sum of weight * gradient over the
    channel's tensors)^2, the loss change its removal would cause to first order."""
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    model.train()  # the loss a fine-tune would see (BatchNorm on batch statistics), as HALP scores during training
    params = dict(model.named_parameters())
    tensors = [_group_tensors(spec, state, g) for g in groups]
    totals = [np.zeros(g.channels) for g in groups]
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    seen = 0
    for x, y in batches(ds, ds.train, batch_size, shuffle=True, generator=generator):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for n, pairs in enumerate(tensors):
                score = torch.zeros(groups[n].channels, dtype=torch.float64)
                for key, dim in pairs:
                    p = params[key]
                    assert p.grad is not None
                    wg = (p * p.grad).double()
                    score += wg.movedim(dim, 0).reshape(wg.shape[dim], -1).sum(dim=1)
                totals[n] += (score ** 2).numpy()
        seen += 1
        if seen == num_batches:
            break
    return [GroupScores(g, np.sort(t / seen)[::-1]) for g, t in zip(groups, totals)]


def _solve(costs: list[np.ndarray], values: list[np.ndarray], capacity: float, bins: int = 2000) -> list[int]:
    """Multiple-choice knapsack: one option per group, total cost <= capacity, largest total value.
    Costs are discretised into `bins` units of capacity (rounded up, so the chosen set never overshoots
    the discretised capacity)."""
    unit = capacity / bins
    best = np.full(bins + 1, -np.inf)
    best[0] = 0.0
    choice: list[np.ndarray] = []
    for cost, value in zip(costs, values):
        steps = np.ceil(np.maximum(cost, 0.0) / unit - 1e-9).astype(int)
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
    # walk back from the best reachable total cost
    at = int(np.argmax(best))
    picks: list[int] = []
    for cost, arg in zip(reversed(costs), reversed(choice)):
        option = int(arg[at])
        picks.append(option)
        at -= int(np.ceil(max(cost[option], 0.0) / unit - 1e-9))
    return picks[::-1]


def knapsack_shape(seed: ArchSpec, scores: list[GroupScores], table: LatencyTable, target_ms: float,
                   log: Callable[[str], None] = print, rounds: int = 12) -> tuple[ArchSpec, float]:
    """The shape keeping the most importance whose predicted latency (raw table sum, as NetAdapt's
    decisions) meets `target_ms`: one width per group from a knapsack over costs linearised at the seed,
    its capacity tightened (bisection) until the exact prediction of the combined shape meets the target."""
    seed_ms = table.raw_ms(seed)
    options: list[list[int]] = []
    costs: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for s in scores:
        widths = [s.group.channels, *s.group.keep_options()]
        options.append(widths)
        costs.append(np.array([table.predict(child_spec(seed, s.group, k)).raw_ms if k != s.group.channels
                               else seed_ms for k in widths]) - (seed_ms - 0.0))
        values.append(np.array([s.kept_importance(k) for k in widths]))
    # costs are latency deltas (<= 0 for a cut): shift to "latency kept" per group so capacity is positive
    base = seed_ms + sum(float(c.min()) for c in costs)  # latency if every group took its cheapest width
    shifted = [c - c.min() for c in costs]
    capacity = target_ms - base  # ms above the network where every group takes its cheapest width
    feasible, infeasible = 0.0, float("inf")  # capacities known to meet / miss the target exactly
    best: tuple[ArchSpec, float] | None = None
    for _ in range(rounds):
        picks = _solve(shifted, values, capacity)
        spec = seed
        for s, widths, pick in zip(scores, options, picks):
            if widths[pick] != s.group.channels:
                spec = child_spec(spec, s.group.name, widths[pick], s.group.step)
        predicted = table.predict(spec).raw_ms
        log(f"  knapsack capacity {capacity:.3f} ms: predicted {predicted:.3f} ms "
            f"({100 * predicted / seed_ms:.1f} % of the seed; target {100 * target_ms / seed_ms:.1f} %)")
        if predicted <= target_ms:
            feasible = max(feasible, capacity)
            if best is None or predicted > best[1]:
                best = (spec, predicted)
            if target_ms - predicted < 0.005 * seed_ms:
                break
            capacity += target_ms - predicted
        else:
            infeasible = min(infeasible, capacity)
            capacity -= predicted - target_ms
        if not feasible < capacity < infeasible:  # the linear step left the bracket: bisect
            capacity = (feasible + infeasible) / 2 if infeasible < float("inf") else 2 * capacity
    if best is None:
        raise RuntimeError(f"no knapsack shape met {target_ms:.3f} ms")
    return best


def group_table(seed: ArchSpec, step: int = 8) -> list[ProposalGroup]:
    return proposal_groups(seed, step)
