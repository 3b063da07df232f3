"""Resolving a SPEC argument: a path, or the name of a search space shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import SpecError


def shipped_dir() -> Path:
    """The folder of YAML search spaces installed with the package (the repo's search_spaces/)."""
    return Path(str(resources.files("mnv3_search.search_spaces"))).resolve()  # in a checkout: search_spaces/


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def resolve_spec_path(argument: str) -> Path:
    """An existing path wins; else `large`, `large.yaml` or `search_spaces/large.yaml` name a shipped space."""
    path = Path(argument)
    if path.exists():
        return path
    if path.parent in (Path("."), Path("search_spaces")):
        candidate = shipped_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if candidate.is_file():
            return candidate
    raise SpecError(
        f"{argument}: no such file, and not a shipped search space; give a YAML path or one of: "
        f"{', '.join(shipped_names())}"
    )
