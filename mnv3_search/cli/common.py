"""Pieces every command shares: reading a SPEC argument with overrides, and the stdout console."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console

from ..spec.spaces import resolve_spec_path
from ..spec.arch import ArchSpec
from ..spec.yaml_io import load_spec


def load_spec_argument(argument: str, err: Console, *, resolution: Optional[int] = None,
                       width: Optional[float] = None, num_classes: Optional[int] = None) -> tuple[ArchSpec, Path]:
    """A path or shipped name, loaded, overridden and validated; says on stderr which file was used."""
    path = resolve_spec_path(argument)
    spec = load_spec(path).with_overrides(resolution=resolution, width=width, num_classes=num_classes,
                                          where=f"{path} with the given options")
    err.print(f"[dim]spec: {path}[/dim]", highlight=False)
    return spec, path


def stdout_console() -> Console:
    """A console on stdout; when piped, wide enough that tables never wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=160)
