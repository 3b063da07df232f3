"""Spec objects, the shipped tables against the paper, width semantics and YAML round trips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mnv3_search import ArchSpec, BneckSpec, SpecError, dump_spec, load_spec, make_divisible, spec_to_yaml

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
