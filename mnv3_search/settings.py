"""Settings declared once: a config dataclass's field says what a user may set and how (`setting()`).

A run's settings used to be written three times: the config's fields and defaults, the command's options with
their own defaults and help, and the hand wiring between them. Now a field declared with `setting()` carries
its help, choices and bounds; the CLI makes the command's option from it (cli/settings.py: type, default, help
and option name all come from the field) and the config checks the choices (`check_choices`). Adding a setting
is one field. No click and no torch here: the commands are built from these without importing either.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Optional

from .errors import UserError

SETTING = "mnv3_search.setting"  # the key of a field's metadata that holds its Setting


@dataclass(frozen=True)
class Setting:
    """How a user sets one config field. The option is `--` plus the field's name with dashes; its type,
    default and whether it is a flag come from the field. Options the commands share (cli/options.py:
    --data, --seed, --backend, ...) take the shared help, and `help` is appended to it."""

    help: str = ""
    choices: tuple[str, ...] = ()  # checked by the config (check_choices) and offered by the option
    minimum: Optional[float] = None  # bounds of a number the option checks; the config checks its own
    maximum: Optional[float] = None
    exclusive: bool = False  # the bounds themselves are out (0 < keep < 1)
    metavar: Optional[str] = None
    path: bool = False  # a file name (the option says so in --help and checks it is not a folder)
    option: bool = True  # False: recorded and checked, but no option (a setting only old run.json files vary)


def setting(default: Any, help: str = "", **how: Any) -> Any:
    """A dataclass field with `default` that users set: `lr: float = setting(0.1, "Learning rate.")`."""
    return field(default=default, metadata={SETTING: Setting(help, **how)})


def option_name(name: str) -> str:
    """The option of field `name`: `short_steps` -> `--short-steps`."""
    return "--" + name.replace("_", "-")


def setting_of(f: Field[Any]) -> Optional[Setting]:
    """The field's Setting, or None for a field that is no user setting (or is wired by hand)."""
    return f.metadata.get(SETTING)


def settings_of(config: Any) -> list[tuple[Field[Any], Setting]]:
    """Every field of the config class (or instance) declared with `setting()`, in field order."""
    return [(f, s) for f in fields(config) if (s := setting_of(f)) is not None]


def check_choices(config: Any) -> None:
    """UserError for the first setting whose value is not one of its choices, named as the user set it."""
    for f, s in settings_of(config):
        value = getattr(config, f.name)
        if s.choices and value not in s.choices:
            name = option_name(f.name) if s.option else f.name
            raise UserError(f"{name} {value!r}: use one of {', '.join(s.choices)}")
