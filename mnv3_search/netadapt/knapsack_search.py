"""`--method knapsack` (HALP-style, prune/knapsack.py) as a `ShapeSearch`: one shot instead of iterations.

The importance of every channel of the seed (`--importance`, Taylor by default), then rounds of: the
knapsack's shape for a goal, timed beside the seed (confirm.py), the goal corrected by the measurement
(tightened when over the budget, loosened when more than KNAPSACK_SLACK under it). Each round is a row of
iterations.csv and a checkpoint; the confirmed shape closest to the budget wins. Seconds, not iterations of
fine-tunes, so a resumed run solves again from the seed. With a MACs or params budget the knapsack's figure is
the network's: one round.
"""

from __future__ import annotations

import time
from typing import Optional

from ..model.counts import spec_macs, spec_params
from ..prune.groups import proposal_groups
from ..prune.importance import TAYLOR_BATCHES, make_importance
from ..prune.knapsack import KnapsackProblem, shrink_to, width_options
from ..prune.surgery import child_spec
from ..spec.yaml_io import spec_to_yaml
from .pricing import BudgetUnreachable
from .runfolder import IterationRecord, RunFolder
from .session import Found, RunSession

KNAPSACK_ROUNDS = 8  # shapes solved and timed beside the seed before the best is taken
KNAPSACK_SLACK = 0.03  # a timed shape this far under the budget is loosened in another round


class KnapsackSearch:
    """The knapsack over the seed's groups, its goal corrected by measurement until a shape meets the budget."""

    def search(self, session: RunSession) -> Found:
        config, folder, pricing, log = session.config, session.folder, session.pricing, session.log
        seed_spec, seed_state, target = session.seed_spec, session.seed_state, session.target
        log.restart()
        groups = proposal_groups(seed_spec, config.step)
        importance = make_importance(config.importance_name(), session.dataset, batch_size=config.batch_size,
                                     seed=config.seed)
        session.emit("importance", groups=len(groups), channels=sum(g.channels for g in groups),
                     name=importance.name, batches=TAYLOR_BATCHES if importance.name == "taylor" else 0)
        scores = importance(seed_spec, seed_state, groups)
        pricing.prefetch([child_spec(seed_spec, g, k, config.step) for g in groups for k in width_options(g)])
        problem = KnapsackProblem.build(seed_spec, scores, pricing.resource)  # priced once for every round
        goal: float = target
        best: Optional[tuple[float, int, IterationRecord]] = None
        reached_by_shape: dict[str, float] = {}  # every timed shape's measured equivalent
        timed: list[tuple[float, float]] = []  # (goal, measured equivalent) of every goal tried
        round_ = 0
        for _ in range(4 * KNAPSACK_ROUNDS):  # goals that give an already timed shape cost no round
            if round_ == KNAPSACK_ROUNDS:
                break
            started = time.perf_counter()
            if pricing.is_latency and goal < problem.cheapest_price:
                # the floor passed check_budget by measurement though the table prices it over: time it
                goal = problem.cheapest_price
            try:
                shape, predicted = problem.shape_for(goal)
            except ValueError:
                raise BudgetUnreachable(f"budget {config.budget} cannot be reached: every group at its smallest "
                                        f"width is over it") from None
            key = spec_to_yaml(shape)
            if key in reached_by_shape:  # timed already: that goal is known, halve the bracket
                timed.append((goal, reached_by_shape[key]))
                halfway = bisect_goal(timed, target)
                if halfway is None:  # every shape so far on one side of the budget: push on past this shape
                    goal = push_goal(goal, reached_by_shape[key], target)
                    continue
                if abs(halfway - goal) < 1e-3 * goal:
                    break
                goal = halfway
                continue
            round_ += 1
            confirmation = session.confirmer.median(shape)
            state = shrink_to(seed_spec, seed_state, scores, shape)
            # no holdout figures: a shape cut in one shot scores near chance before any training
            row = IterationRecord(
                iteration=round_, proposal="knapsack", target_latency_ms=pricing.latency_ms(goal),
                predicted_latency_ms=pricing.latency_ms(predicted), macs=spec_macs(shape), params=spec_params(shape),
                wall_seconds=time.perf_counter() - started, **confirmation.row_update)
            RunFolder.save(shape, state, folder.iteration_checkpoint(round_))
            log.append(row)
            session.emit("knapsack", round=round_, goal=goal, predicted=predicted, ok=confirmation.ok)
            if not pricing.is_latency:  # exact counts: the knapsack's figure is the network's
                return Found(shape, state, row)
            reached = reached_by_shape[key] = session.confirmer.equivalent(row)
            timed.append((goal, reached))
            if confirmation.ok and (best is None or reached > best[0]):
                best = (reached, round_, row)
            if confirmation.ok and reached >= target * (1 - KNAPSACK_SLACK):
                break
            goal = next_goal(timed, target)
        if best is None:
            raise BudgetUnreachable(f"--method knapsack: no shape was measured within budget {config.budget} in "
                                    f"{len(log.rows) - 1} rounds (iterations.csv in {folder.path} has their "
                                    f"measurements); run again, or use --method netadapt")
        spec, state = RunFolder.load(folder.iteration_checkpoint(best[1]))
        return Found(spec, state, best[2])


def _bracket(timed: list[tuple[float, float]], target: float
             ) -> Optional[tuple[tuple[float, float], tuple[float, float]]]:
    """Of the (goal, measured equivalent) rounds, the one measured closest under the target and the one
    closest over it; None without both."""
    under = [t for t in timed if t[1] <= target]
    over = [t for t in timed if t[1] > target]
    if not (under and over):
        return None
    return max(under, key=lambda t: t[1]), min(over, key=lambda t: t[1])


def next_goal(timed: list[tuple[float, float]], target: float) -> float:
    """The knapsack's next table goal from the rounds timed so far, (goal, measured equivalent) each: between
    the closest round under the target and the closest over it, the goal where the straight line through them
    reaches the target (the table's error changes with the shape, so one ratio does not carry over); without
    both, the last goal scaled by target / measured."""
    bracket = _bracket(timed, target)
    if bracket is not None:
        (g0, m0), (g1, m1) = bracket
        if m1 > m0 and g1 != g0:
            return g0 + (target - m0) * (g1 - g0) / (m1 - m0)
    goal, reached = timed[-1]
    return goal * target / reached


def push_goal(goal: float, reached: float, target: float) -> float:
    """The next goal when `goal` gave a shape timed already (measured equivalent `reached`) and no round lies
    on the other side of the target: scaled by target / reached as `next_goal` does, but by at least
    KNAPSACK_SLACK, so the knapsack has to choose another shape. Scaled by the ratio alone, a round measured
    just over the budget (71 % for 70 %) can give a goal whose shape is the same, and the run would stop after
    that one round with nothing within budget."""
    if reached > target:
        return goal * min(target / reached, 1 - KNAPSACK_SLACK)
    return goal * max(target / reached, 1 + KNAPSACK_SLACK)


def bisect_goal(timed: list[tuple[float, float]], target: float) -> Optional[float]:
    """Halfway between the goals of the closest round under the target and the closest over it (when the
    interpolated goal gives a shape already timed); None without both."""
    bracket = _bracket(timed, target)
    return None if bracket is None else (bracket[0][0] + bracket[1][0]) / 2
