"""Shared fixtures and markers.

Session fixtures: the shipped specs; the tiny real runs (tests/support/tiny_run.py), made once per session and
process; a PostgreSQL server per test that asks for one; an S3 endpoint, started once when a test needs it.

Markers (pyproject.toml declares them): a test that asks for a real run or a server is marked `slow` here, from
the fixtures it uses, and so is every `postgres` and `timing` test; other tests of a second or more carry the
mark themselves. `pytest -m "not slow"` runs the fast unit tests alone (under a minute); `postgres` marks the
tests that start a PostgreSQL server; `timing` the ones that decide on measured latency (scripts/test.sh runs
them alone, after the rest).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from mnv3_search import ArchSpec, load_spec
from support.postgres import PostgresServer, restartable_postgres, running_postgres, skip_without_postgres
from support.s3server import S3Server, running_s3
from support.tiny_run import build_micro_run, build_tiny_run, build_tiny_seed

# The machine's latency table lives in ~/.cache/mnv3-search/lut unless $MNV3_SEARCH_LUT_DIR says otherwise:
# tests (and the processes they start) share one table in a temp folder, never the real home.
LUT_DIR = Path(tempfile.mkdtemp(prefix="mnv3-test-lut-"))
atexit.register(shutil.rmtree, LUT_DIR, True)
os.environ["MNV3_SEARCH_LUT_DIR"] = str(LUT_DIR)

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"

# fixtures that cost a real run, a server or a runtime's conversion: a test using one is `slow`
SLOW_FIXTURES = {"tiny_run", "tiny_run_events", "micro_run", "postgres_url", "postgres_server", "s3"}
POSTGRES_FIXTURES = {"postgres_url", "postgres_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SLOW_FIXTURES or item.get_closest_marker("timing") or item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.slow)
        if used & POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)


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
def tiny_run_events() -> list[tuple[str, dict[str, Any]]]:
    """Every (kind, info) the tiny run emits, in order; filled when `tiny_run` is made."""
    return []


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_run_events: list[tuple[str, dict[str, Any]]]) -> Path:
    """Small at 64 px adapted to 5.3M MACs on 240 digits (one real run for the session, ~15-40 s)."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny-run") / "tiny-small-macs",
                          on_event=lambda kind, **info: tiny_run_events.append((kind, info)))


@pytest.fixture(scope="session")
def tiny_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's seed alone (~3 s): what the `timing` tests adapt."""
    return build_tiny_seed(tmp_path_factory.mktemp("tiny-seed") / "tiny-seed.pt")


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro network adapted to MICRO_BUDGET in one process: the reference other runs must reproduce."""
    return build_micro_run(tmp_path_factory.mktemp("micro-run") / "micro-macs")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server of the test's own (database `mnv3`, trusted on loopback): its URL."""
    skip_without_postgres()
    yield from running_postgres()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """As postgres_url, with the server itself, which the test can restart in the middle of a run."""
    skip_without_postgres()
    yield from restartable_postgres()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-protocol server (moto's, tests/support/s3server.py) for the session, stopped at its end."""
    yield from running_s3()
