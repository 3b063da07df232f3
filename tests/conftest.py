"""Shared fixtures: the shipped specs, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnv3_search import ArchSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"


@pytest.fixture(scope="session")
def large() -> ArchSpec:
    return load_spec(SPACES / "large.yaml")


@pytest.fixture(scope="session")
def small() -> ArchSpec:
    return load_spec(SPACES / "small.yaml")
