"""The YAML form of an ArchSpec: a bneck table readable like Tables 1-2 of the MobileNetV3 paper.

A row is a list `[k, exp, out, SE, NL, s]`, or a mapping with those keys plus the optional flags `expand`
(whether the 1x1 expansion conv exists) and `residual` (whether the block adds its input), each defaulting
to the paper's rule and written by `dump_spec` only where a pruned network departs from it.

Every mistake is reported as one line naming the file, the row and the field, with how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from ..errors import SpecError
from ..fileio import PathLike, atomic_write_text
from .arch import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_KERNEL,
    MAX_RESOLUTION,
    NONLINEARITIES,
    ArchSpec,
    BneckSpec,
    StemSpec,
    validate_spec,
)
from .spaces import resolve_spec_path

ROW_FIELDS = ("k", "exp", "out", "se", "nl", "s")
ROW_HELP = "[k, exp, out, SE, NL, s]"
TOP_KEYS = ("name", "resolution", "width", "num_classes", "dropout", "stem", "bneck", "last_conv", "classifier")
REQUIRED_TOP_KEYS = ("stem", "bneck", "last_conv", "classifier")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any, where: str, what: str, minimum: int = 1, maximum: int = MAX_CHANNELS) -> int:
    if not _is_int(value):
        raise SpecError(f"{where}: {what} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise SpecError(f"{where}: {what} must be at least {minimum}, got {value}")
    if value > maximum:
        raise SpecError(f"{where}: {what} {value} is absurdly large; use at most {maximum}")
    return value


def _channels(value: Any, where: str) -> int:
    return _integer(value, where, "a channel count", 1, MAX_CHANNELS)


def _kernel(value: Any, where: str) -> int:
    if not _is_int(value) or value <= 0 or value % 2 == 0 or value > MAX_KERNEL:
        raise SpecError(f"{where}: kernel must be a positive odd integer up to {MAX_KERNEL} (3, 5, 7), got {value!r}")
    return value


def _stride(value: Any, where: str) -> int:
    if not _is_int(value) or value not in (1, 2):
        raise SpecError(f"{where}: stride must be 1 or 2, got {value!r}")
    return value


def _nl(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in NONLINEARITIES:
        raise SpecError(f"{where}: unknown nonlinearity {value!r}; use RE (ReLU) or HS (hard-swish)")
    return value.upper()


def _boolean(value: Any, where: str, what: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: {what} must be true or false, got {value!r}")
    return value


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: {what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _mapping(value: Any, where: str, keys: Mapping[str, Callable[[Any, str], Any]], required: tuple[str, ...],
             ) -> dict[str, Any]:
    """Check a small mapping (stem, last_conv, classifier, a bneck row) key by key."""
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping like {{{', '.join(f'{k}: ...' for k in keys)}}}, got {value!r}")
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(keys)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise SpecError(f"{where}: missing key {missing[0]!r}; required keys are {', '.join(required)}")
    return {k: check(value[k], f"{where}, field '{k}'") for k, check in keys.items() if k in value}


def _row(raw: Any, where: str) -> BneckSpec:
    checks: dict[str, Callable[[Any, str], Any]] = {
        "k": _kernel,
        "exp": _channels,
        "out": _channels,
        "se": lambda v, w: _boolean(v, w, "SE"),
        "nl": _nl,
        "s": _stride,
        "expand": lambda v, w: _boolean(v, w, "expand"),
        "residual": lambda v, w: _boolean(v, w, "residual"),
    }
    if isinstance(raw, list):
        if len(raw) != len(ROW_FIELDS):
            raise SpecError(f"{where}: a row has {len(ROW_FIELDS)} values {ROW_HELP}, got {len(raw)}: {raw!r}")
        raw = dict(zip(ROW_FIELDS, raw))
    elif not isinstance(raw, dict):
        raise SpecError(f"{where}: a row must be a list {ROW_HELP} or a mapping with keys "
                        f"{', '.join(ROW_FIELDS)}, got {raw!r}")
    fields = _mapping(raw, where, checks, ROW_FIELDS)
    return BneckSpec(kernel=fields["k"], exp=fields["exp"], out=fields["out"], se=fields["se"], nl=fields["nl"],
                     stride=fields["s"], expand=fields.get("expand"), residual=fields.get("residual"))


CHOICE_TOP_KEYS = ("resolution", "width", "dropout")
CHOICE_SECTIONS = ("stem", "last_conv", "classifier")


def find_choices(data: Any) -> list[tuple[tuple, str, list]]:
    """List cells of a search space: (path into the parsed YAML, where in words, the options).

    A cell holding a list is a choice: a top-level resolution/width/dropout, a field of stem, last_conv or
    classifier, or a cell of a bneck row (list form `[k, exp, out, SE, NL, s]` or mapping form)."""
    found: list[tuple[tuple, str, list]] = []
    if not isinstance(data, dict):
        return found
    for key in CHOICE_TOP_KEYS:
        if isinstance(data.get(key), list):
            found.append(((key,), f"field '{key}'", data[key]))
    for section in CHOICE_SECTIONS:
        if isinstance(data.get(section), dict):
            for key, value in data[section].items():
                if isinstance(value, list):
                    found.append(((section, key), f"{section}, field '{key}'", value))
    rows = data.get("bneck")
    if isinstance(rows, list):
        for i, row in enumerate(rows, start=1):
            cells: Iterable[tuple[int | str, Any]] = (
                enumerate(row) if isinstance(row, list) and len(row) == len(ROW_FIELDS)
                else row.items() if isinstance(row, dict) else ())
            for column, value in cells:
                if isinstance(value, list):
                    name = ROW_FIELDS[column] if isinstance(column, int) else column
                    found.append((("bneck", i - 1, column), f"bneck row {i}, field '{name}'", value))
    return found


def spec_from_dict(data: Any, source: str = "<spec>") -> ArchSpec:
    """Validate parsed YAML and build the ArchSpec; errors name `source`, the row and the field."""
    if data is None:
        raise SpecError(f"{source}: the file is empty; it must be a mapping with keys {', '.join(REQUIRED_TOP_KEYS)}")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping (key: value), got a {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{source}: unknown key {unknown[0]!r}; allowed keys are {', '.join(TOP_KEYS)}")
    missing = [k for k in REQUIRED_TOP_KEYS if k not in data]
    if missing:
        raise SpecError(f"{source}: missing key {missing[0]!r}; a spec needs {', '.join(REQUIRED_TOP_KEYS)}")
    choices = find_choices(data)
    if choices:
        _, where, options = choices[0]
        raise SpecError(f"{source}: {where} holds a list of choices {options!r}: this is a search space, not one "
                        f"network; explore it with `mnv3-search explore {source} --budget ...`")

    stem = _mapping(data["stem"], f"{source}: stem", {"out": _channels, "k": _kernel, "s": _stride, "nl": _nl},
                    ("out",))
    last = _mapping(data["last_conv"], f"{source}: last_conv", {"out": _channels, "nl": _nl}, ("out",))
    head = _mapping(data["classifier"], f"{source}: classifier", {"hidden": _channels, "nl": _nl}, ("hidden",))

    rows = data["bneck"]
    if not isinstance(rows, list):
        raise SpecError(f"{source}: bneck must be a list of rows {ROW_HELP}, got {rows!r}")
    if not rows:
        raise SpecError(f"{source}: bneck is empty; a network needs at least one row {ROW_HELP}")
    blocks = tuple(_row(raw, f"{source}: bneck row {i}") for i, raw in enumerate(rows, start=1))

    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise SpecError(f"{source}: field 'name' must be a non-empty string, got {name!r}")
    width = _number(data.get("width", 1.0), f"{source}: field 'width'", "width")
    if not width > 0:
        raise SpecError(f"{source}: field 'width': width must be > 0, got {width}; use e.g. 1.0 or 0.75")
    dropout = _number(data.get("dropout", 0.2), f"{source}: field 'dropout'", "dropout")
    if not 0.0 <= dropout < 1.0:
        raise SpecError(f"{source}: field 'dropout': dropout must be in [0, 1), got {dropout}")
    spec = ArchSpec(
        name=name,
        blocks=blocks,
        stem=StemSpec(out=stem["out"], kernel=stem.get("k", 3), stride=stem.get("s", 2), nl=stem.get("nl", "HS")),
        last_conv=last["out"],
        last_nl=last.get("nl", "HS"),
        hidden=head["hidden"],
        head_nl=head.get("nl", "HS"),
        num_classes=_integer(data.get("num_classes", 1000), f"{source}: field 'num_classes'", "num_classes",
                             1, MAX_CLASSES),
        dropout=dropout,
        resolution=_integer(data.get("resolution", 224), f"{source}: field 'resolution'", "resolution",
                            1, MAX_RESOLUTION),
        width=width,
    )
    validate_spec(spec, source)
    return spec


def read_yaml(path: PathLike) -> Any:
    """Parse a YAML file; a missing, unreadable or malformed file is one line naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{source}: no such file; "
                        "give a path to a YAML spec or a shipped name (large, small)") from None
    except IsADirectoryError:
        raise SpecError(f"{source}: is a folder, not a YAML spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"{source}: cannot read the file ({reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: YAML syntax error{at}: {problem}; fix the syntax there") from None


def load_spec(path: PathLike) -> ArchSpec:
    """Read and validate a YAML bneck table: a path, or a shipped name (`large`, `small.yaml`) as the CLI's
    SPEC argument accepts it; an existing file of that name wins."""
    path = resolve_spec_path(str(path))
    return spec_from_dict(read_yaml(path), str(path))


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        plain = value.isidentifier() and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def spec_to_yaml(spec: ArchSpec) -> str:
    """The spec as a commented YAML table, one flow-style row per bneck, as the shipped files look."""
    stem = spec.stem
    lines = [
        f"name: {_scalar(spec.name)}",
        f"resolution: {spec.resolution}",
        f"width: {spec.width!r}",
        f"num_classes: {spec.num_classes}",
        f"dropout: {spec.dropout!r}",
        "",
        f"stem: {{out: {stem.out}, k: {stem.kernel}, s: {stem.stride}, nl: {stem.nl}}}",
        "",
        "bneck:",
        "  #  k  exp  out   SE     NL  s",
    ]
    for b in spec.blocks:
        cells = [f"{b.kernel}", f"{b.exp:>4}", f"{b.out:>4}", f"{_scalar(b.se):<5}", b.nl, f"{b.stride}"]
        # the flags are written only where they depart from the paper's rule (ArchSpec keeps None otherwise
        # for residual; expand is kept as given)
        flags = [(name, value) for name, value in (("expand", b.expand), ("residual", b.residual))
                 if value is not None]
        if not flags:
            lines.append(f"  - [{', '.join(cells)}]")
        else:
            pairs = ", ".join(f"{n}: {c.strip()}" for n, c in zip(ROW_FIELDS, cells))
            extra = "".join(f", {name}: {_scalar(value)}" for name, value in flags)
            lines.append(f"  - {{{pairs}{extra}}}")
    lines += [
        "",
        f"last_conv: {{out: {spec.last_conv}, nl: {spec.last_nl}}}",
        f"classifier: {{hidden: {spec.hidden}, nl: {spec.head_nl}}}",
        "",
    ]
    return "\n".join(lines)


def dump_spec(spec: ArchSpec, path: PathLike) -> None:
    """Write the spec as YAML atomically; `load_spec` of the file gives back an equal spec."""
    atomic_write_text(path, spec_to_yaml(spec))
