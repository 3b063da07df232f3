"""One tiny real NetAdapt run (Small, 64 px, MACs budget, digits), made once per test session and shared."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

# every (kind, info) the tiny run emitted, in order (tests/test_events.py checks them against EventKind)
TINY_RUN_EVENTS: list[tuple[str, dict[str, Any]]] = []


@lru_cache(maxsize=None)
def tiny_run_folder() -> Path:
    """~15-40 s on 2 shared cores: 1-2 iterations, 4-step fine-tunes, 2 seed epochs on 240 images."""
    from mnv3_search.netadapt import RunConfig, run_netadapt

    root = Path(tempfile.mkdtemp(prefix="mnv3-tiny-run-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / "tiny-small-macs"
    config = RunConfig(spec_path="small", budget="5.3M-macs", data="digits", resolution=64, limit=240,
                       batch_size=32, short_steps=4, seed_epochs=2, long_epochs=1, threads=1)
    run_netadapt(config, out=str(out), on_event=lambda kind, **info: TINY_RUN_EVENTS.append((kind, info)))
    return out
