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
