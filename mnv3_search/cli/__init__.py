"""The click commands: a thin layer that parses, calls the library and renders with rich."""

from .main import cli, main

__all__ = ["cli", "main"]
