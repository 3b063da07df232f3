"""Settings declared once (settings.py, cli/settings.py): each command option that sets a config field has the
field's name, default, choices and bounds; every setting has its option; every option reaches its field."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Optional

import click
import pytest
from click.testing import CliRunner

from mnv3_search.cli import cli
from mnv3_search.cli import options as shared
from mnv3_search.cli.settings import config_options
from mnv3_search.errors import UserError
from mnv3_search.explore import ExploreConfig
from mnv3_search.netadapt.config import RunConfig
from mnv3_search.settings import option_name, setting_of, settings_of

# (command, its config, the fields its function wires by hand: name -> the function's parameter)
COMMANDS = [("netadapt", RunConfig, {"spec_path": "spec", "budget": "budget"}),
            ("explore", ExploreConfig, {"spec_path": "spec", "budget": "budget"})]


def _default(param: click.Parameter) -> Any:
    """What the command's function receives when the option is not given (click's UNSET is None there)."""
    value = param.get_default(click.Context(click.Command("x")), call=False)
    return None if value is None or type(value).__name__ == "Sentinel" else value


def mismatches(command: click.Command, config: type, by_hand: dict[str, str]) -> list[str]:
    """Every way `command`'s options disagree with `config`'s settings (empty: they agree)."""
    problems: list[str] = []
    params = {p.name: p for p in command.params}
    for f, s in settings_of(config):
        param = params.get(f.name)
        if not s.option:
            if param is not None:
                problems.append(f"{f.name}: declared without an option, yet the command has one")
            continue
        if not isinstance(param, click.Option):
            problems.append(f"{f.name}: no option")
            continue
        if option_name(f.name) not in param.opts:
            problems.append(f"{f.name}: the option is {param.opts}, not {option_name(f.name)}")
        if _default(param) != f.default or type(_default(param)) is not type(f.default):
            problems.append(f"{f.name}: option default {_default(param)!r}, field default {f.default!r}")
        choices = tuple(getattr(param.type, "choices", ()) or ())
        if s.choices and choices != s.choices:
            problems.append(f"{f.name}: option choices {choices}, field choices {s.choices}")
        if isinstance(f.default, bool) != param.is_flag:
            problems.append(f"{f.name}: a bool field is a flag and only a bool field")
        if f.name not in shared.SHARED_OPTIONS:
            bounds = (getattr(param.type, "min", None), getattr(param.type, "max", None))
            if bounds != (s.minimum, s.maximum):
                problems.append(f"{f.name}: option bounds {bounds}, field bounds {(s.minimum, s.maximum)}")
            if param.help != s.help:
                problems.append(f"{f.name}: option help {param.help!r}, field help {s.help!r}")
    names = {f.name: f for f in fields(config)}
    for name, param in params.items():  # an option named after a field is its setting, unless wired by hand
        if name in names and setting_of(names[name]) is None and name not in by_hand:
            problems.append(f"{name}: an option for a field that is no setting()")
    for field_name, param_name in by_hand.items():
        default = names[field_name].default
        if default is not MISSING and _default(params[param_name]) != default:
            problems.append(f"{field_name}: option default {_default(params[param_name])!r}, field {default!r}")
    return problems


@pytest.mark.parametrize("name,config,by_hand", COMMANDS)
def test_options_agree_with_their_configs_settings(name: str, config: type, by_hand: dict[str, str]) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    assert mismatches(command, config, by_hand) == []
    # the settings without an option are deliberate, and every field is accounted for
    without = {f.name for f in fields(config) if (s := setting_of(f)) is None or not s.option} - set(by_hand)
    assert without == ({"ladder", "num_classes"} if config is RunConfig else {"holdout"})


def _command(*options: Any) -> click.Command:
    def body(**kwargs: Any) -> None:
        pass

    for option in reversed(options):
        body = option(body)
    return click.command()(body)


def test_a_default_or_choice_that_drifts_from_its_field_is_caught() -> None:
    """The check above fails when an option and its field part: a hand-written option with another default,
    other choices, a generated option altered, a setting without its option."""
    generated = _command(config_options(RunConfig, "data"))
    assert mismatches(generated, RunConfig, {}) == []
    drifted = _command(config_options(RunConfig, "data", "evaluation"),
                       click.option("--short-steps", type=click.IntRange(min=1), default=30, show_default=True,
                                    help="Fine-tune steps per proposal."),
                       config_options(RunConfig, "rungs"))
    assert mismatches(drifted, RunConfig, {}) == ["short_steps: option default 30, field default 20"]
    other_choices = _command(config_options(RunConfig, "data", "select"),
                             click.option("--evaluation", type=click.Choice(["halving"]), default="halving",
                                          show_default=True, help=setting_of(
                                              next(f for f in fields(RunConfig) if f.name == "evaluation")).help),
                             config_options(RunConfig, "short_steps"))
    assert mismatches(other_choices, RunConfig, {}) == [
        "evaluation: option choices ('halving',), field choices ('halving', 'full')"]
    altered = _command(config_options(RunConfig, "data"))
    next(p for p in altered.params if p.name == "batch_size").default = 32
    assert mismatches(altered, RunConfig, {}) == ["batch_size: option default 32, field default 64"]
    missing = _command(config_options(RunConfig, "data", "lut"))
    assert mismatches(missing, RunConfig, {}) == ["max_iterations: no option"]


def test_data_help_is_the_librarys() -> None:
    from mnv3_search.data import SOURCES_HELP

    assert shared.DATA_HELP == f"Dataset: {SOURCES_HELP}."


@pytest.mark.parametrize("config", [RunConfig, ExploreConfig])
def test_every_choice_setting_is_checked_by_the_config(config: type) -> None:
    for f, s in settings_of(config):
        if s.choices:
            with pytest.raises(UserError, match=f"^{option_name(f.name) if s.option else f.name} 'nonsense': "
                                                f"use one of {', '.join(s.choices)}$"):
                config(spec_path="small", budget="90%", **{f.name: "nonsense"})


def _other_value(config: type, name: str) -> tuple[str, Any]:
    """A value unlike the field's default, as typed on the command line and as the config then holds it."""
    f = next(f for f in fields(config) if f.name == name)
    s = setting_of(f)
    assert s is not None
    # values that fit the other settings (openvino: a backend with INT8, which --precision int8 needs)
    fixed: dict[str, Any] = {"backend": "openvino", "keep": 0.5, "rungs": 2}
    if s.choices:
        value: Any = next(c for c in s.choices if c != f.default)
    elif name in fixed:
        value = fixed[name]
    elif name == "holdout":
        return "0.2", 0.2
    elif isinstance(f.default, bool):
        return "", True
    elif isinstance(f.default, float):
        value = f.default * 2
    elif isinstance(f.default, int) or f.default is None and name in ("resolution", "limit"):
        value = (f.default or 48) + 1
    else:
        value = f"other-{name}"
    return str(value), value


@pytest.mark.parametrize("name,config,by_hand", COMMANDS)
def test_every_option_reaches_its_setting(name: str, config: type, by_hand: dict[str, str], tmp_path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each setting typed on the command line arrives in the config the command builds."""
    built: list[Any] = []

    class Built(Exception):
        pass

    def capture(config_: Any, *args: Any, **kwargs: Any) -> None:
        built.append(config_)
        raise Built

    monkeypatch.setattr(f"mnv3_search.cli.{name}.{'NetAdapt' if name == 'netadapt' else 'run_explore'}", capture)
    args, want = [name, "small", "--budget", "90%", "--device", "cpu"], {}
    for f, s in settings_of(config):
        if s.option:
            text, value = _other_value(config, f.name)
            args += [option_name(f.name)] + ([text] if text else [])
            want[f.name] = value
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, Built), result.output
    got: Optional[Any] = built[0]
    assert {k: getattr(got, k) for k in want} == want
    assert (got.spec_path, got.budget) == ("small", "90%")
