"""Options made from a config dataclass's settings (settings.py), so a setting is declared once: in its field.

`config_options(RunConfig, "data", "evaluation")` is a decorator that adds one option per setting from field
`data` to field `evaluation`, in field order; a command takes its settings in a few such runs, with its other
options (--out, --workers, ...) between them where its --help shows them. The option's name is the field's
(`short_steps` -> `--short-steps`), its default the field's default, its type the field's (a bool is a flag;
choices, bounds and a file name from the Setting). Options the commands share (options.SHARED_OPTIONS) keep
their common help, type and checks, with the field's default and help. The command then builds its config as
`Config(**settings)`; tests/cli/test_cli.py holds every option to its field.

Imports click and settings.py only: the config class comes from the command's module, which main.py imports
when the command runs or shows its help, never for `mnv3-search --help`.
"""

from __future__ import annotations

import types
from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import click

from .options import SHARED_OPTIONS
from ..settings import Setting, option_name, settings_of

F = TypeVar("F", bound=Callable[..., Any])


def _value_type(config: type, f: Field[Any]) -> type:
    """The field's type with Optional taken off (`Optional[int]` -> int)."""
    hint = get_type_hints(config)[f.name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def setting_option(config: type, f: Field[Any], s: Setting) -> Callable[[F], F]:
    """The click option of one setting."""
    default = None if f.default is MISSING else f.default
    if f.name in SHARED_OPTIONS:
        return SHARED_OPTIONS[f.name](default=default, more_help=s.help)
    if not s.help:
        raise TypeError(f"{config.__name__}.{f.name}: a setting needs help, or the name of a shared option")
    kind = _value_type(config, f)
    extra: dict[str, Any] = {} if default is None else {"default": default, "show_default": True}
    if s.metavar:
        extra["metavar"] = s.metavar
    if kind is bool:
        return click.option(option_name(f.name), is_flag=True, help=s.help)
    if s.choices:
        extra["type"] = click.Choice(s.choices)
    elif s.path:
        extra["type"] = click.Path(dir_okay=False)
    elif kind is int:
        extra["type"] = click.IntRange(min=_int(s.minimum), max=_int(s.maximum)) if _bounded(s) else int
    elif kind is float:
        extra["type"] = click.FloatRange(min=s.minimum, max=s.maximum, min_open=s.exclusive,
                                         max_open=s.exclusive) if _bounded(s) else float
    return click.option(option_name(f.name), help=s.help, **extra)


def _int(bound: Optional[float]) -> Optional[int]:
    return None if bound is None else int(bound)


def _bounded(s: Setting) -> bool:
    return s.minimum is not None or s.maximum is not None


def config_options(config: type, first: str, last: Optional[str] = None) -> Callable[[F], F]:
    """Options for `config`'s settings from field `first` through field `last` (default: the last field),
    in field order; settings declared with `option=False` get none."""
    names = [f.name for f in fields(config)]
    chosen = names[names.index(first):names.index(last) + 1 if last else len(names)]
    options = [setting_option(config, f, s) for f, s in settings_of(config) if s.option and f.name in chosen]

    def decorate(command: F) -> F:
        for option in reversed(options):  # click lists a command's options in the reverse order of decoration
            command = option(command)
        return command

    return decorate
