"""The one exception type for mistakes a user can fix (bad YAML, bad checkpoint, bad option).

The CLI turns it into a single line on stderr and exit status 2; library callers can catch it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, phrased as one line: what, where, how to fix."""

    exit_code = 2  # the CLI's status for it (docs/reliability.md: exit codes)


class SpecError(UserError):
    """A network description (YAML or ArchSpec) that cannot describe a valid MobileNetV3."""


class CheckpointError(UserError):
    """A weights file that cannot be read or does not fit the network's spec."""


class RunInterrupted(UserError):
    """Something the run depends on failed mid-run, not the user's input: a full disk, an artifact store that
    answers with errors (the database server gone is study.StorageLost). One line; every finished step is kept,
    and the same command resumes the run once the cause is fixed."""

    exit_code = 4  # docs/reliability.md: exit codes (resumable)


class DiskFull(RunInterrupted):
    """No space left on the device (or the quota) while writing a file; the file's atomic write left nothing."""


class StoreFailed(RunInterrupted):
    """The artifact store answered with an error (an S3 5xx, a refused connection, an unwritable folder)."""
