"""Shared fixtures: the shipped specs, loaded once per session; an S3 endpoint, started once when a test needs it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

from mnv3_search import ArchSpec, load_spec
from s3server import S3Server, running_s3

# The machine's latency table lives in ~/.cache/mnv3-search/lut unless $MNV3_SEARCH_LUT_DIR says otherwise:
# tests (and the processes they start) share one table in a temp folder, never the real home.
LUT_DIR = Path(tempfile.mkdtemp(prefix="mnv3-test-lut-"))
atexit.register(shutil.rmtree, LUT_DIR, True)
os.environ["MNV3_SEARCH_LUT_DIR"] = str(LUT_DIR)

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """On 2 shared cores, torch's second thread spin-waits whenever the other core is busy (up to 100x
    slower); the suite runs single-threaded like the tool's defaults."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def large() -> ArchSpec:
    return load_spec(SPACES / "large.yaml")


@pytest.fixture(scope="session")
def small() -> ArchSpec:
    return load_spec(SPACES / "small.yaml")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-protocol server (moto's, tests/s3server.py) for the session, stopped at its end."""
    yield from running_s3()
