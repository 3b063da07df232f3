"""Proposal groups and channel surgery: the expected groups, children that always rebuild and load
strict, and exact equivalence with a parent whose removed channels are silenced."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mnv3_search import (ArchSpec, BneckSpec, StemSpec, UserError, build_model, load_spec, proposal_groups,
                         shrink, spec_to_yaml)
from mnv3_search.model.layout import HIDDEN_LINEAR, block_keys, last_conv_prefix, stem_prefix
from mnv3_search.spec.yaml_io import dump_spec
from mnv3_search.prune.surgery import ShrinkPlan, apply_plan, plan_shrink

LARGE_GROUPS = {
    "out0-1": 16, "exp2": 64, "out2-3": 24, "exp3": 72, "exp4": 72, "out4-6": 40, "exp5": 120, "exp6": 120,
    "exp7": 240, "out7-10": 80, "exp8": 200, "exp9": 184, "exp10": 184, "exp11": 480, "out11-12": 112,
    "exp12": 672, "exp13": 672, "out13-15": 160, "exp14": 960, "exp15": 960, "last_conv": 960, "hidden": 1280,
}
SMALL_GROUPS = {
    "out0": 16, "out1": 16, "exp2": 72, "out2-3": 24, "exp3": 88, "exp4": 96, "out4-6": 40, "exp5": 240,
    "exp6": 240, "exp7": 120, "out7-8": 48, "exp8": 144, "exp9": 288, "out9-11": 96, "exp10": 576,
    "exp11": 576, "last_conv": 576, "hidden": 1024,
}


def _tiny(spec: ArchSpec) -> ArchSpec:
    return replace(spec, num_classes=10, resolution=32)


def _randomized(spec: ArchSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with realistic BN statistics (measured on random images, so signals neither vanish nor
    explode), then random BN scales and shifts, SE biases and classifier weights: silenced channels matter."""
    torch.manual_seed(seed)
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for key, t in sd.items():
        if "running" in key or "num_batches" in key:
            continue
        if key.endswith(".weight") and t.dim() == 1:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif key.startswith("classifier") and key.endswith(".weight"):
            t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
        elif key.endswith(".bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    model.load_state_dict(sd)
    with torch.no_grad():  # outputs of order 1, so atol 1e-5 is a tight test
        scale = model.eval()(torch.randn(8, 3, 32, 32, generator=g)).std()
        sd["classifier.3.weight"] /= scale
        sd["classifier.3.bias"] /= scale
    return sd


def _meta_load(spec: ArchSpec, sd: dict[str, torch.Tensor]) -> None:
    """Strict load without paying for weight init (shapes and keys are still checked)."""
    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict(sd, strict=True, assign=True)


# --- groups -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, expected", [("large", LARGE_GROUPS), ("small", SMALL_GROUPS)])
def test_expected_groups(variant: str, expected: dict[str, int], request) -> None:
    groups = proposal_groups(request.getfixturevalue(variant))
    assert {g.name: g.channels for g in groups} == expected
    assert len(groups) == len(expected)
    kinds = [g.kind for g in groups]
    assert kinds.count("last_conv") == 1 and kinds.count("hidden") == 1
    assert kinds.count("coupled-out") == 6


def test_large_coupled_sets_follow_residuals(large: ArchSpec) -> None:
    groups = {g.name: g for g in proposal_groups(large)}
    assert groups["out0-1"].producers == (0, 1) and groups["out0-1"].exp_blocks == (1,)
    assert groups["out7-10"].producers == (7, 8, 9, 10)
    assert groups["out7-10"].blocks == (7, 8, 9, 10, 11)  # block 11 consumes the set
    # block 11 (80 -> 112, stride 1) has no add: every width is open to both sets
    assert 80 in groups["out11-12"].keep_options() and 112 not in groups["out7-10"].keep_options()
    assert groups["out11-12"].keep_options() == tuple(range(104, 7, -8))


def test_a_shrink_to_equal_widths_keeps_the_parent_without_an_add(small: ArchSpec, tmp_path) -> None:
    """Small's out7-8 (block 7: 40 -> 48, stride 1, no add) can go to 40: block 7 says residual: false."""
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "out7-8", 40)
    configs = list(child.block_configs())
    assert (configs[6].in_channels, configs[6].out, configs[6].stride) == (40, 40, 1)
    assert child.blocks[6].residual is False and configs[6].residual is False
    assert [c.residual for c in configs] == [c.residual for c in spec.block_configs()]
    assert [b.residual for i, b in enumerate(child.blocks) if i != 6] == [None] * 10  # the rule elsewhere
    text = spec_to_yaml(child)
    assert text.count("residual") == 1
    assert "  - {k: 5, exp: 120, out: 40, se: true, nl: HS, s: 1, residual: false}\n" in text
    dump_spec(child, tmp_path / "child.yaml")
    assert load_spec(tmp_path / "child.yaml") == child
    model = build_model(child)
    model.load_state_dict(child_sd, strict=True)
    assert [m.use_res_connect for m in model.features[1:12]] == [c.residual for c in configs]
    assert {g.name for g in proposal_groups(child)} == set(SMALL_GROUPS)  # same sets, same names
    # shrinking on: widths differ again, so the flag repeats the rule and is dropped
    grandchild, _ = shrink(child, child_sd, "out7-8", 32)
    assert grandchild.blocks[6].residual is None and "residual" not in spec_to_yaml(grandchild)
    # and the input side: out4-6 from 40 to 32 makes block 7 32 -> 40 (no flag needed either)
    other, _ = shrink(child, child_sd, "out4-6", 32)
    assert other.blocks[6].residual is None and not list(other.block_configs())[6].residual


def test_large_block_11_can_take_its_input_width(large: ArchSpec) -> None:
    spec = _tiny(large)
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "out11-12", 80)  # block 11: 80 -> 80 without an add, block 12 keeps its
    assert child.blocks[10].residual is False and child.blocks[11].residual is None
    assert [c.residual for c in child.block_configs()] == [c.residual for c in spec.block_configs()]
    _meta_load(child, child_sd)


def test_small_block1_expansion_is_coupled_to_the_stem(small: ArchSpec) -> None:
    groups = {g.name: g for g in proposal_groups(small)}
    assert groups["out0"].exp_blocks == (1,) and "exp1" not in groups


def test_step_and_keep_options(small: ArchSpec) -> None:
    groups = {g.name: g for g in proposal_groups(small, step=16)}
    assert groups["exp2"].keep_options() == (64, 48, 32, 16)
    assert groups["out0"].keep_options() == ()
    with pytest.raises(UserError, match="step"):
        proposal_groups(small, step=0)


def test_groups_of_a_width_scaled_spec_are_concrete(small: ArchSpec) -> None:
    groups = {g.name: g.channels for g in proposal_groups(replace(small, width=0.75))}
    assert groups["out9-11"] == 72 and groups["hidden"] == 1024


# --- every proposal yields a loadable, round-tripping child ---------------------------------------------


def _sweep(options: tuple[int, ...]) -> list[int]:
    """A handful of keep counts: the largest, the smallest, and a few between."""
    if len(options) <= 4:
        return list(options)
    picks = {options[0], options[-1], options[len(options) // 3], options[2 * len(options) // 3]}
    return sorted(picks, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["large", "small"])
def test_every_proposal_gives_a_child_that_round_trips_and_loads_strict(variant: str, request, tmp_path) -> None:
    spec = _tiny(request.getfixturevalue(variant))
    sd = build_model(spec).state_dict()
    count = 0
    for group in proposal_groups(spec):
        for keep in _sweep(group.keep_options()):
            child, child_sd = shrink(spec, sd, group, keep)
            path = tmp_path / f"{group.name}-{keep}.yaml"
            dump_spec(child, path)
            assert load_spec(path) == child
            _meta_load(child, child_sd)
            after = {g.name: g.channels for g in proposal_groups(child)}
            assert after[group.name] == keep
            count += 1
    assert count > 50


@pytest.mark.slow
def test_full_keep_sweep_on_small_loads_strict(small: ArchSpec) -> None:
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    for group in proposal_groups(spec, step=32):
        for keep in group.keep_options():
            child, child_sd = shrink(spec, sd, group.name, keep, step=32)
            _meta_load(child, child_sd)


def test_children_chain_and_real_model_runs(small: ArchSpec) -> None:
    spec, sd = _tiny(small), build_model(_tiny(small)).state_dict()
    for name, keep in [("exp10", 288), ("out9-11", 64), ("out0", 8), ("last_conv", 256), ("hidden", 512),
                       ("out4-6", 24), ("exp5", 40)]:
        spec, sd = shrink(spec, sd, name, keep)
    model = build_model(spec)
    model.load_state_dict(sd, strict=True)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shrinking_exp_to_the_input_keeps_the_expansion_conv(large: ArchSpec, tmp_path) -> None:
    spec = _tiny(large)
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "exp2", 16)  # block 2: in 16, exp 64 -> 16
    assert child.blocks[1].expand is True and child.blocks[1].exp == 16
    assert "features.2.block.0.0.weight" in child_sd  # the trained expansion conv survives
    dump_spec(child, tmp_path / "c.yaml")
    assert "expand: true" in spec_to_yaml(child)
    assert load_spec(tmp_path / "c.yaml") == child
    _meta_load(child, child_sd)
    assert "exp2" in {g.name for g in proposal_groups(child)}  # still an expansion group of its own


def test_shrinking_the_input_to_equal_exp_keeps_the_expansion_conv() -> None:
    spec = ArchSpec(name="toy", stem=StemSpec(out=32), num_classes=10, resolution=32, last_conv=64, hidden=64,
                    blocks=(BneckSpec(3, 16, 24, True, "HS", 2), BneckSpec(3, 48, 32, True, "RE", 2)))
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "out1", 16)  # block 2: in 24 -> 16 ... exp 48 stays
    child, child_sd = shrink(child, child_sd, "exp2", 16)
    assert child.blocks[1].expand is True
    child, child_sd = shrink(spec, sd, "out0", 16)  # block 1: in 32 -> 16 == exp 16: keep its conv
    assert child.blocks[0].expand is True
    _meta_load(child, child_sd)


def test_width_scaled_parent(small: ArchSpec) -> None:
    spec = replace(_tiny(small), width=0.75)
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "out9-11", 48)
    assert child.width == 1.0 and child.blocks[-1].out == 48
    _meta_load(child, child_sd)


def test_l2_norm_selection_sums_over_producers(small: ArchSpec) -> None:
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    # channel 5 strong at one producer only, channel 9 moderately strong at all three
    for i, prefix in enumerate(["features.4.block.3", "features.5.block.3", "features.6.block.3"]):
        w = sd[f"{prefix}.0.weight"]
        w.mul_(0.01)
        w[9].fill_(1.0)
        if i == 0:
            w[5].fill_(2.0)
    plan = plan_shrink(spec, sd, "out4-6", 8)
    assert 9 in plan.kept.tolist() and 5 in plan.kept.tolist()
    assert plan.kept.tolist() == sorted(plan.kept.tolist())


# --- equivalence ----------------------------------------------------------------------------------------


def _silence(spec: ArchSpec, sd: dict[str, torch.Tensor], plan: ShrinkPlan) -> dict[str, torch.Tensor]:
    """Zero the BN scale and shift of every removed channel at every layer producing it, and the fc1 rows
    of removed SE squeeze channels: activations of those channels are then exactly 0 everywhere."""
    sd = {k: v.clone() for k, v in sd.items()}
    group = plan.group
    removed = sorted(set(range(group.channels)) - set(plan.kept.tolist()))
    configs = list(spec.block_configs())

    def zero_bn(prefix: str) -> None:
        sd[f"{prefix}.1.weight"][removed] = 0
        sd[f"{prefix}.1.bias"][removed] = 0

    if group.kind == "expansion":
        keys = block_keys(configs[group.producers[0] - 1])
        zero_bn(keys.expand)
        zero_bn(keys.depthwise)  # the depthwise BN turns a zero input into its shift: silence it too
    elif group.kind == "coupled-out":
        for p in group.producers:
            zero_bn(stem_prefix() if p == 0 else block_keys(configs[p - 1]).project)
        for i in group.exp_blocks:
            zero_bn(block_keys(configs[i - 1]).depthwise)
    elif group.kind == "last_conv":
        zero_bn(last_conv_prefix(spec))
    else:
        sd[f"{HIDDEN_LINEAR}.weight"][removed] = 0
        sd[f"{HIDDEN_LINEAR}.bias"][removed] = 0
    for index, se_kept in plan.se_kept.items():
        se = block_keys(configs[index - 1]).se
        squeeze = sd[f"{se}.fc1.bias"].shape[0]
        gone = sorted(set(range(squeeze)) - set(se_kept.tolist()))
        sd[f"{se}.fc1.weight"][gone] = 0
        sd[f"{se}.fc1.bias"][gone] = 0
    return sd


EQUIVALENCE_CASES = [
    ("small", "out0", 8),        # stem + block 1's expansion (no expansion conv), SE width stays 8
    ("small", "exp4", 40),       # expansion with SE 24 -> 16
    ("small", "out4-6", 24),     # residual set 4-6 with SE blocks consuming it
    ("small", "out9-11", 48),    # residual set feeding the last conv
    ("small", "exp10", 200),     # SE 144 -> 56
    ("small", "last_conv", 256),
    ("small", "hidden", 200),
    ("small", "out7-8", 40),     # block 7 becomes 40 -> 40 at stride 1 without an add (residual: false)
    ("large", "out0-1", 8),      # stem + residual block 1 without expansion conv
    ("large", "exp2", 16),       # exp becomes equal to the input: conv kept
    ("large", "out7-10", 48),    # 4-way residual set
    ("large", "exp13", 320),     # SE 168 -> 80
    ("large", "out13-15", 96),
    ("large", "last_conv", 512),
    ("large", "hidden", 640),
    ("large", "out11-12", 80),   # block 11 becomes 80 -> 80 at stride 1 without an add
]


@pytest.mark.slow
@pytest.mark.parametrize("variant, name, keep", EQUIVALENCE_CASES)
def test_child_equals_parent_with_removed_channels_silenced(variant: str, name: str, keep: int, request) -> None:
    spec = _tiny(request.getfixturevalue(variant))
    sd = _randomized(spec)
    plan = plan_shrink(spec, sd, name, keep)
    child_sd = apply_plan(sd, plan)
    # float64: convs of different widths sum in different orders, and float32 rounding of that (~1e-5 here)
    # would blur the test; in float64 any real mismatch stands out by orders of magnitude
    parent = build_model(spec).eval()
    parent.load_state_dict(_silence(spec, sd, plan), strict=True)
    child = build_model(plan.child).eval()
    child.load_state_dict(child_sd, strict=True)
    unsilenced = build_model(spec).eval()
    unsilenced.load_state_dict(sd)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = parent.double()(x), child.double()(x)
        assert not torch.allclose(unsilenced.double()(x), got, atol=1e-3)  # the silencing mattered
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_equivalence_cases_cover_every_kind_with_se_and_residuals(large: ArchSpec, small: ArchSpec) -> None:
    kinds = set()
    for variant, name, _ in EQUIVALENCE_CASES:
        group = {g.name: g for g in proposal_groups(large if variant == "large" else small)}[name]
        kinds.add(group.kind)
    assert kinds == {"expansion", "coupled-out", "last_conv", "hidden"}


def test_keeping_everything_is_an_exact_copy(small: ArchSpec) -> None:
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    child, child_sd = shrink(spec, sd, "exp5", 240)
    assert child == spec
    assert all(torch.equal(child_sd[k], sd[k]) and child_sd[k] is not sd[k] for k in sd)


# --- rejections -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, keep, message", [
    ("exp99", 8, "unknown proposal group 'exp99'.*exp2"),
    ("exp2", 4, "keep 4 for group exp2 is below the step of 8"),
    ("exp2", 0, "below the step"),
    ("exp2", 80, "keep 80 for group exp2 is more than its current 72 channels"),
    ("exp2", 60, "not a multiple of the step 8"),
    ("exp2", 8.0, "must be an integer"),
])
def test_surgery_rejections(small: ArchSpec, name: str, keep, message: str) -> None:
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    with pytest.raises(UserError, match=message):
        shrink(spec, sd, name, keep)


def test_state_dict_of_another_network_is_rejected(small: ArchSpec, large: ArchSpec) -> None:
    sd = build_model(_tiny(large)).state_dict()
    with pytest.raises(UserError, match="does not fit spec"):
        shrink(_tiny(small), sd, "exp2", 64)


def test_a_group_from_another_spec_is_rejected(small: ArchSpec) -> None:
    spec = _tiny(small)
    sd = build_model(spec).state_dict()
    group = {g.name: g for g in proposal_groups(spec)}["exp2"]
    child, child_sd = shrink(spec, sd, group, 64)
    with pytest.raises(UserError, match="another spec"):
        shrink(child, child_sd, group, 56)
