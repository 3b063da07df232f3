"""What the wheel will hold, checked from pyproject.toml without building it (scripts/wheel_check.sh builds
and installs the real wheel in CI): every subpackage, the shipped YAML, py.typed, the licence, the floors."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration
from setuptools.discovery import PEP420PackageFinder

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def _packages() -> list[str]:
    """The package list setuptools computes from pyproject.toml (its `packages.find`)."""
    config = read_configuration(PYPROJECT, expand=False)["tool"]["setuptools"]
    find = dict(config["packages"]["find"])
    return sorted(PEP420PackageFinder.find(str(REPO / find.pop("where", ["."])[0]), **find))


def test_every_folder_of_python_code_is_a_package_of_the_wheel() -> None:
    on_disk = sorted(".".join(p.parent.relative_to(REPO).parts)
                     for p in (REPO / "mnv3_search").rglob("*.py") if "__pycache__" not in p.parts)
    packages = _packages()
    assert set(on_disk) <= set(packages), sorted(set(on_disk) - set(packages))
    assert {"mnv3_search.netadapt", "mnv3_search.cli", "mnv3_search.search_spaces",
            "mnv3_search.search_spaces.examples"} <= set(packages)
    assert not [p for p in packages if not p.startswith("mnv3_search")]  # nothing else lands in site-packages


def test_package_data_covers_the_shipped_spaces_and_py_typed() -> None:
    data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]
    spaces = REPO / "mnv3_search" / "search_spaces"
    assert spaces.resolve() == (REPO / "search_spaces").resolve()  # the link the wheel is built through
    shipped = sorted(str(p.relative_to(spaces)) for p in spaces.rglob("*.yaml"))
    covered = sorted(str(p.relative_to(spaces)) for pattern in data["mnv3_search.search_spaces"]
                     for p in spaces.glob(pattern))
    assert shipped == covered and "examples/small_choices.yaml" in shipped
    assert "py.typed" in data["mnv3_search"] and (REPO / "mnv3_search" / "py.typed").is_file()


def test_licence_and_floors() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["license"] == "MIT" and "mnv3-search developers" in (REPO / "LICENSE").read_text()
    floors = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=(\S+)", dep)
        assert m, f"{dep!r}: wheel_check.sh needs a plain >= floor"
        floors[m[1].lower()] = m[2]
    assert floors["optuna"].startswith("5.")  # Trial.set_constraint; JournalFileBackend (4)
    assert floors["torch"] == "2.13.0"
    # the floors are what this suite runs on: never above the installed versions
    for name, floor in floors.items():
        installed = metadata.version(name).split("+")[0]
        assert tuple(int(v) for v in re.findall(r"\d+", installed)[:3]) >= \
            tuple(int(v) for v in re.findall(r"\d+", floor)[:3]), (name, installed, floor)
    extras = project["optional-dependencies"]
    assert set(extras) == {"postgres", "s3", "dashboard", "executorch", "openvino", "test"}
    assert extras["dashboard"][0].startswith("optuna-dashboard") and extras["s3"][0].startswith("boto3")
    # an extra's floor (or pin) is a version the suite runs on: the test extra carries each of them
    for name in ("postgres", "s3", "dashboard", "executorch", "openvino"):
        assert set(extras[name]) <= set(extras["test"]), name
    # the deployment runtimes are pinned (==) to the releases tested beside torch 2.13.0 (executorch declares no
    # torch pin; tests/latency/test_runtimes.py checks the installed ones); everything else is a plain >= floor
    pinned = {re.split("==", dep)[0] for name in ("executorch", "openvino") for dep in extras[name]}
    for dep in extras["test"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[a-z0-9,]+\])?(>=|==)(\S+)", dep)
        assert m and (m[2] == "==") == (m[1] in pinned), f"{dep!r}: a plain >= floor, or a runtime's == pin"
        installed = metadata.version(m[1]).split("+")[0]
        assert tuple(int(v) for v in re.findall(r"\d+", installed)[:3]) >= \
            tuple(int(v) for v in re.findall(r"\d+", m[3])[:3]), (m[1], installed, m[3])


def test_the_readme_is_a_guide_of_at_most_20000_characters_with_the_test_command() -> None:
    """The README is the user's guide: dated figures and run histories go to docs/ and CHANGELOG.md, so it stays
    short enough to read; it shows the command CI runs, and every docs/ page it links exists."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 20_000, len(text.encode())  # bytes: the stricter count (× and – are 2)
    assert "bash scripts/test.sh" in text
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    assert linked and not [page for page in sorted(linked) if not (REPO / page).exists()]
