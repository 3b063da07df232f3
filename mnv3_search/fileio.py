"""Atomic file writes: a killed process never leaves a half-written CSV, YAML or checkpoint behind."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:  # pandas is imported by the callers that have frames; --help stays fast without it
    import pandas as pd

from .errors import DiskFull

PathLike = Union[str, os.PathLike]
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full device or a full quota: the same advice


def disk_full(exc: BaseException, path: Optional[PathLike] = None) -> Optional[DiskFull]:
    """`exc` (or what caused it: Optuna and torch wrap the OSError) as one line when it is a full disk, else
    None. `path`: the file being written, when the error does not name it."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, DiskFull):  # said already, by the write that knew its file
            return seen
        if isinstance(seen, OSError) and seen.errno in FULL:
            where = path if path is not None else seen.filename
            return DiskFull(f"no space left on device writing {where}: free space and run the same command again")
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds. A full disk
    is one line naming `target` (DiskFull), and the temporary file is removed: nothing half-written is left for
    a resumed run to read."""
    target = Path(target)
    tmp: Optional[Path] = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any file
        tmp = Path(tmp_name)
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        full = disk_full(exc, target)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_file(path: Path, data: bytes) -> None:
    """The one place file bytes are written (tests make it fail as a full disk would)."""
    with open(path, "wb") as handle:
        handle.write(data)


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        write_file(tmp, data)


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
