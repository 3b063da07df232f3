"""How often idle pollers read the storage: a worker with nothing to claim, a leader waiting for other workers."""

from __future__ import annotations

import time

POLL_LOW_SECONDS, POLL_HIGH_SECONDS = 0.1, 1.6  # Backoff: pollers wait this little at first, this long idle


class Backoff:
    """How long a poller sleeps when it found nothing to do: `low` at first, doubling up to `high`, back to
    `low` once it found work. Idle workers and a waiting leader then read the storage about once per `high`
    seconds instead of several times a second (each read is a query on PostgreSQL, a file replay on a journal),
    while a burst of new trials (a rung enqueued) is still picked up within `low` seconds by a busy poller."""

    def __init__(self, low: float = POLL_LOW_SECONDS, high: float = POLL_HIGH_SECONDS) -> None:
        if not 0 < low <= high:
            raise ValueError(f"Backoff needs 0 < low <= high, got {low}, {high}")
        self.low, self.high, self.next = low, high, low

    def idle(self) -> float:
        """The sleep to take now that a poll found nothing; the next one is twice as long (at most `high`)."""
        wait, self.next = self.next, min(self.high, self.next * 2)
        return wait

    def busy(self) -> None:
        """A poll found work: the next idle poll sleeps `low` again."""
        self.next = self.low

    def sleep(self) -> None:
        time.sleep(self.idle())
