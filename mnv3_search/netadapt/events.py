"""What a NetAdapt run tells its caller while it works: `on_event(kind, **info)`, kind one of `EventKind`.

One closed list, so a front end (the CLI's live view) can handle every kind and a test can prove it does:
a kind emitted but not declared here fails type checking (mypy) and tests/netadapt/test_events.py.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, get_args

EventKind = Literal[
    "resume",            # run_dir: the run folder already held this run; it continues
    "already_finished",  # run_dir: the run folder holds a finished run; nothing is trained
    "nothing_to_do",     # seed, target: the seed already meets the budget
    "transfer",          # note: --weights made for another class count (all but the last layer loaded)
    "seed_training",     # epochs: training the seed first
    "seed_step",         # step, loss
    "calibrating",       # measuring the seed to calibrate the latency table
    "seed",              # value, target, unit: the seed's figure and the budget's target
    "iteration",         # iteration, current, goal, target, proposals
    "progress",          # iteration, rung, rungs, done, running, pruned, total
    "retry",             # iteration: a dead or silent worker's proposal was enqueued again
    "recovered",         # note: a trial's files were unreadable; its proposal is trained again from its parent
    "chosen",            # the iterations.csv row of the winner, and resource
    "unreliable",        # attempt, ratio_shift, spread: the host disturbed a confirmation; measuring again
    "confirm",           # measured, seed_measured, ok, reliable: the whole network timed beside the seed
    "disagreement",      # the confirmation's row update and corrected_target: the table was off; going on
    "importance",        # groups, channels, name, batches (0: no data): --method knapsack scores every channel
    "knapsack",          # round, goal, predicted, ok: a knapsack shape, timed beside the seed (ok: within budget)
    "long_finetune",     # epochs, method: the final fine-tune, or the retrain (--final)
    "long_step",         # step, loss
    "finished",          # test_accuracy
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)


class Event(Protocol):
    """A run's `on_event`: called with one of EVENT_KINDS and that kind's details as keywords."""

    def __call__(self, kind: EventKind, **info: Any) -> None: ...


def ignore(kind: EventKind, **info: Any) -> None:
    """The default `on_event`: a library caller that does not listen."""
