"""Atomic file writes: a killed process never leaves a half-written CSV, YAML or checkpoint behind."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

if TYPE_CHECKING:  # pandas is imported by the callers that have frames; --help stays fast without it
    import pandas as pd

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any file
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target: PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(frame: "pd.DataFrame", path: PathLike) -> None:
    """Write `frame` as CSV to `path` atomically, or to stdout when `path` is '-'."""
    if str(path) == "-":
        sys.stdout.write(frame.to_csv(index=False))
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def json_cut_short(text: str, error: json.JSONDecodeError) -> bool:
    """Whether a JSON object file that failed to decode was cut short (a kill or a full disk mid-write) rather
    than written wrong: it starts an object and the decoder failed at its very end (a cut right after an inner
    "}" still ends in "}", so the last character alone cannot tell)."""
    stripped = text.rstrip()
    return text.lstrip().startswith("{") and (not stripped.endswith("}") or error.pos >= len(stripped))
