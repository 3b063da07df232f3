"""Idle pollers back off: a worker with nothing to claim, and a leader waiting for other workers' trials,
read the storage less and less often (up to once per POLL_HIGH_SECONDS), and fast again once work appears."""

from __future__ import annotations

import optuna
import pytest

from mnv3_search.netadapt import evaluate, polling as polling_module
from mnv3_search.netadapt.polling import POLL_HIGH_SECONDS, POLL_LOW_SECONDS, Backoff


def test_backoff_doubles_to_its_ceiling_and_resets_on_work() -> None:
    backoff = Backoff(0.1, 1.6)
    assert [backoff.idle() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 1.6, 1.6])
    backoff.busy()
    assert [backoff.idle() for _ in range(2)] == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="0 < low <= high"):
        Backoff(0.5, 0.1)


def test_an_idle_worker_polls_less_and_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty study: the worker's sleeps grow to the ceiling; 20 polls span ~26 s instead of 10 s at the
    fixed 0.5 s it used to wait."""
    sleeps: list[float] = []
    monkeypatch.setattr(polling_module.time, "sleep", sleeps.append)
    study = optuna.create_study()
    done = evaluate.work(study, evaluator=None, should_stop=lambda: len(sleeps) >= 20)  # type: ignore[arg-type]
    assert done == 0
    assert sleeps[:5] == pytest.approx([POLL_LOW_SECONDS * 2 ** k for k in range(5)])
    assert sleeps[5:] == pytest.approx([POLL_HIGH_SECONDS] * 15)


def test_a_worker_that_found_work_polls_fast_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials enqueued after the worker went idle are taken, and its next idle poll is short again."""
    sleeps: list[float] = []
    study = optuna.create_study()
    evaluated: list[int] = []

    class Evaluator:
        def evaluate(self, study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
            evaluated.append(trial.number)
            study.tell(trial, 0.0)
            return optuna.trial.TrialState.COMPLETE

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:  # a rung is enqueued while the worker waits
            study.enqueue_trial({})
            study.enqueue_trial({})

    monkeypatch.setattr(polling_module.time, "sleep", sleep)
    done = evaluate.work(study, Evaluator(), should_stop=lambda: len(sleeps) >= 6)  # type: ignore[arg-type]
    assert done == 2 and evaluated == [0, 1]
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.1, 0.2])
