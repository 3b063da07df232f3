"""Spec objects, the shipped tables against the paper, width semantics and YAML round trips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mnv3_search import ArchSpec, BneckSpec, SpecError, StemSpec, build_model, dump_spec, load_spec, make_divisible, \
    spec_to_yaml
from mnv3_search.spec.arch import se_width

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"

# REFERENCE §1, Tables 1 and 2: (k, exp, out, SE, NL, s) per bneck row.
PAPER_LARGE = [
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
]
PAPER_SMALL = [
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
]


def rows(spec: ArchSpec) -> list[tuple]:
    return [(b.kernel, b.exp, b.out, b.se, b.nl, b.stride) for b in spec.blocks]


@pytest.mark.parametrize(
    "value, expected",
    [(16, 16), (12, 16), (18, 24), (72 * 0.75, 56), (960 * 0.75, 720), (3, 8), (20, 24), (44, 48), (4.0, 8)],
)
def test_make_divisible(value: float, expected: int) -> None:
    assert make_divisible(value, 8) == expected


def test_shipped_tables_are_the_papers(large: ArchSpec, small: ArchSpec) -> None:
    assert rows(large) == PAPER_LARGE
    assert rows(small) == PAPER_SMALL
    assert (large.stem.out, large.last_conv, large.hidden) == (16, 960, 1280)
    assert (small.stem.out, small.last_conv, small.hidden) == (16, 576, 1024)
    assert (large.resolution, large.num_classes, large.dropout, large.width) == (224, 1000, 0.2, 1.0)
    assert large.total_stride == small.total_stride == 32


def test_block_configs_resolve_inputs_residuals_and_se(large: ArchSpec) -> None:
    configs = list(large.block_configs())
    assert [c.in_channels for c in configs] == [16, 16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160]
    assert [c.residual for c in configs] == [True, False, True, False, True, True, False, True, True, True,
                                             False, True, False, True, True]
    assert [c.expand_conv for c in configs] == [False] + [True] * 14
    assert [c.se_channels for c in configs if c.se] == [24, 32, 32, 120, 168, 168, 240, 240]


def test_width_075_follows_paper_semantics(large: ArchSpec, small: ArchSpec) -> None:
    scaled = replace(large, width=0.75).scaled()
    assert scaled.stem.out == 16 and scaled.last_conv == 720 and scaled.hidden == 1280
    assert [b.out for b in scaled.blocks] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 88, 88, 120, 120, 120]
    assert [b.exp for b in scaled.blocks][:4] == [16, 64, 72, 72]
    assert replace(small, width=0.75).scaled().hidden == 1024
    assert large.scaled() is large


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 1.25])
def test_round_trip(tmp_path, large: ArchSpec, small: ArchSpec, width: float) -> None:
    for spec in (large, small):
        original = replace(spec, width=width)
        dump_spec(original, tmp_path / "spec.yaml")
        assert load_spec(tmp_path / "spec.yaml") == original


def test_round_trip_keeps_expand_flag_and_odd_names(tmp_path, small: ArchSpec) -> None:
    blocks = list(small.blocks)
    blocks[2] = replace(blocks[2], exp=24, expand=True)  # pruned down to its input, expansion conv kept
    spec = replace(small, name="true", blocks=tuple(blocks), num_classes=10, dropout=0.0, resolution=64)
    dump_spec(spec, tmp_path / "child.yaml")
    loaded = load_spec(tmp_path / "child.yaml")
    assert loaded == spec
    assert loaded.blocks[2] == BneckSpec(3, 24, 24, False, "RE", 1, expand=True)
    assert list(loaded.block_configs())[2].expand_conv is True
    assert "expand: true" in spec_to_yaml(spec)


def test_dump_is_atomic_and_leaves_no_temp_files(tmp_path, large: ArchSpec) -> None:
    dump_spec(large, tmp_path / "out" / "large.yaml")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["large.yaml"]


def test_se_width_is_the_papers_squeeze(large: ArchSpec) -> None:
    assert [se_width(e) for e in (16, 72, 96, 120, 240, 480, 576, 672, 960)] == [8, 24, 24, 32, 64, 120, 144, 168,
                                                                                  240]
    assert all(c.se_channels == se_width(c.exp) for c in large.block_configs())


# --- the residual flag ------------------------------------------------------------------------------------


def _small_with_row(small: ArchSpec, index: int, **change) -> ArchSpec:
    blocks = list(small.blocks)
    blocks[index - 1] = replace(blocks[index - 1], **change)
    return replace(small, blocks=tuple(blocks))


def _small_yaml_with_flag(row: int, value: str) -> str:
    """The shipped small.yaml with bneck row `row` in mapping form, carrying `residual: value`."""
    lines = (SPACES / "small.yaml").read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("  - [")]
    k, exp, out, se, nl, s = (cell.strip() for cell in lines[rows[row - 1]].strip()[3:-1].split(","))
    lines[rows[row - 1]] = f"  - {{k: {k}, exp: {exp}, out: {out}, se: {se}, nl: {nl}, s: {s}, residual: {value}}}"
    return "\n".join(lines) + "\n"


def test_residual_false_drops_the_add_and_round_trips(tmp_path, small: ArchSpec) -> None:
    spec = _small_with_row(small, 8, residual=False)  # row 8: 48 -> 48, stride 1: an add by the rule
    assert [c.residual for c in spec.block_configs()][5:8] == [True, False, False]
    text = spec_to_yaml(spec)
    assert "  - {k: 5, exp: 144, out: 48, se: true, nl: HS, s: 1, residual: false}\n" in text
    assert text.count("residual") == 1  # written only where it departs from the rule
    dump_spec(spec, tmp_path / "s.yaml")
    assert load_spec(tmp_path / "s.yaml") == spec
    model = build_model(spec)
    assert [m.use_res_connect for m in model.features[1:12]] == [c.residual for c in spec.block_configs()]
    assert sum(p.numel() for p in model.parameters()) == 2_542_856  # an add has no parameters


def test_a_flag_that_repeats_the_rule_is_dropped(tmp_path, small: ArchSpec) -> None:
    same = _small_with_row(_small_with_row(small, 8, residual=True), 9, residual=False)  # rule: add; s2: none
    assert same == small and same.blocks[7].residual is None and same.blocks[8].residual is None
    text = _small_yaml_with_flag(8, "true")
    assert "residual: true}" in text
    (tmp_path / "s.yaml").write_text(text)
    assert load_spec(tmp_path / "s.yaml") == small
    assert "residual" not in spec_to_yaml(load_spec(tmp_path / "s.yaml"))


@pytest.mark.parametrize("row, value, message", [
    (9, "true", "bneck row 9, field 'residual': true needs stride 1 and equal input and output widths, but this "
                "row has stride 2 and 48 -> 96 channels; remove 'residual' or set it to false"),
    (7, "true", "bneck row 7, field 'residual': true needs stride 1 and equal input and output widths, but this "
                "row has stride 1 and 40 -> 48 channels; remove 'residual' or set it to false"),
    (8, "yes-please", "bneck row 8, field 'residual': residual must be true or false, got 'yes-please'"),
])
def test_an_impossible_residual_is_one_line_naming_file_row_and_field(tmp_path, row: int, value: str,
                                                                      message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_small_yaml_with_flag(row, value))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {message}"


def test_width_scaling_never_adds_a_residual(tmp_path) -> None:
    """44 -> 48 at stride 1 has no add; at width 0.5 both round to 24, and still no add."""
    spec = ArchSpec(name="toy", stem=StemSpec(out=44), num_classes=10, resolution=32, last_conv=64, hidden=64,
                    blocks=(BneckSpec(3, 96, 48, False, "RE", 1), BneckSpec(3, 96, 48, False, "RE", 1)),
                    width=0.5)
    scaled = spec.scaled()
    assert (scaled.stem.out, scaled.blocks[0].out) == (24, 24)
    assert scaled.blocks[0].residual is False and scaled.blocks[1].residual is None
    assert [c.residual for c in spec.block_configs()] == [False, True]
    dump_spec(scaled, tmp_path / "s.yaml")
    assert load_spec(tmp_path / "s.yaml") == scaled


# --- shipped names ------------------------------------------------------------------------------------------


def test_load_spec_takes_shipped_names_as_the_cli_does(large: ArchSpec, small: ArchSpec, tmp_path,
                                                       monkeypatch) -> None:
    assert load_spec("large") == large
    assert load_spec("small.yaml") == small
    assert load_spec("search_spaces/small.yaml") == small
    assert load_spec(Path("large")) == large
    with pytest.raises(SpecError) as info:
        load_spec("medium")
    assert str(info.value) == ("medium: no such file, and not a shipped search space; give a YAML path or one of: "
                               "large, small")
    monkeypatch.chdir(tmp_path)  # an existing file of that name wins
    dump_spec(replace(small, name="mine"), tmp_path / "large")
    assert load_spec("large").name == "mine"
