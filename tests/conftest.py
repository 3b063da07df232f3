"""Shared fixtures: the shipped specs, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnv3_search import ArchSpec, load_spec

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
