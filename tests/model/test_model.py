"""The builder: exact published parameter counts and torchvision's layout, checked against an
independent functional forward pass written from REFERENCE §1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mnv3_search import ArchSpec, build_model, count_params
from mnv3_search.latency import BlockKey, spec_keys
from mnv3_search.model.counts import spec_macs, spec_params, unit_macs, unit_params
from mnv3_search.model.layout import unit_modules
from mnv3_search.profile import profile_model
from mnv3_search.prune.surgery import child_spec
from mnv3_search.spec.arch import BlockConfig
from mnv3_search.spec.units import BneckUnit, ClassifierUnit, spec_units

from support.reference_weights import reference_state_dict

EPS = 0.001


@pytest.mark.parametrize(
    "variant, width, params",
    [("large", 1.0, 5_483_032), ("small", 1.0, 2_542_856), ("large", 0.75, 3_993_528), ("small", 0.75, 2_041_872)],
)
def test_published_parameter_counts(variant: str, width: float, params: int, request) -> None:
    spec = request.getfixturevalue(variant)
    assert count_params(build_model(replace(spec, width=width))) == params


@pytest.mark.parametrize("variant", ["large", "small"])
def test_state_dict_keys_and_shapes_are_torchvisions(variant: str, request) -> None:
    model = build_model(request.getfixturevalue(variant))
    reference = reference_state_dict(variant)
    ours = model.state_dict()
    assert list(ours) == list(reference)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    model.load_state_dict(reference, strict=True)


def _nl(x: torch.Tensor, nl: str) -> torch.Tensor:
    return F.relu(x) if nl == "RE" else x * F.relu6(x + 3) / 6


def _conv_bn(x: torch.Tensor, sd: dict, prefix: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
    w = sd[f"{prefix}.0.weight"]
    x = F.conv2d(x, w, None, stride, (w.shape[-1] - 1) // 2, 1, groups)
    return F.batch_norm(x, sd[f"{prefix}.1.running_mean"], sd[f"{prefix}.1.running_var"], sd[f"{prefix}.1.weight"],
                        sd[f"{prefix}.1.bias"], False, 0.0, EPS)


def _block(x: torch.Tensor, sd: dict, c: BlockConfig, no_add: bool = False) -> torch.Tensor:
    """One bneck; the add by the paper's rule (stride 1, in == out) unless `no_add`."""
    p, i = f"features.{c.index}.block", 0
    y = x
    if c.expand_conv:
        y, i = _nl(_conv_bn(y, sd, f"{p}.{i}"), c.nl), i + 1
    y, i = _nl(_conv_bn(y, sd, f"{p}.{i}", c.stride, groups=c.exp), c.nl), i + 1
    if c.se:
        s = F.adaptive_avg_pool2d(y, 1)
        s = F.relu(F.conv2d(s, sd[f"{p}.{i}.fc1.weight"], sd[f"{p}.{i}.fc1.bias"]))
        s = F.conv2d(s, sd[f"{p}.{i}.fc2.weight"], sd[f"{p}.{i}.fc2.bias"])
        y, i = y * (F.relu6(s + 3) / 6), i + 1
    y = _conv_bn(y, sd, f"{p}.{i}")
    return y + x if c.stride == 1 and c.in_channels == c.out and not no_add else y


def reference_forward(spec: ArchSpec, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """MobileNetV3 as REFERENCE §1 describes it, in functional form, straight from the state_dict."""
    x = _nl(_conv_bn(x, sd, "features.0", stride=2), "HS")
    for config in spec.block_configs():
        x = _block(x, sd, config)
    x = _nl(_conv_bn(x, sd, f"features.{len(spec.blocks) + 1}"), "HS")
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    x = _nl(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]), "HS")
    return F.linear(x, sd["classifier.3.weight"], sd["classifier.3.bias"])


@pytest.mark.parametrize("variant", ["large", "small"])
def test_outputs_match_reference_forward_with_torchvision_weights(variant: str, request) -> None:
    spec = request.getfixturevalue(variant)
    sd = reference_state_dict(variant, seed=1)
    model = build_model(spec).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
        expected = reference_forward(spec, sd, x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_residual_false_removes_exactly_that_add(small: ArchSpec) -> None:
    blocks = list(small.blocks)
    blocks[7] = replace(blocks[7], residual=False)  # row 8: 48 -> 48, stride 1
    spec = replace(small, blocks=tuple(blocks))
    sd = reference_state_dict("small", seed=1)
    model = build_model(spec).eval()
    model.load_state_dict(sd, strict=True)
    config = list(spec.block_configs())[7]
    x = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.features[8](x)
        torch.testing.assert_close(ours, _block(x, sd, config, no_add=True), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, _block(x, sd, config), atol=0.1)  # the add would move it by x
    assert [m.use_res_connect for m in model.features[5:10]] == [True, True, False, False, False]
    assert [c.residual for c in spec.block_configs()][4:9] == [True, True, False, False, False]


def test_structure_details(large: ArchSpec) -> None:
    model = build_model(large)
    first, fourth = model.features[1], model.features[4]
    assert len(first.block) == 2 and first.use_res_connect  # no expansion conv, residual
    assert fourth.block[2].fc1.out_channels == 24 and not fourth.use_res_connect
    bn = model.features[0][1]
    assert (bn.eps, bn.momentum) == (0.001, 0.01)
    assert model.features[1].block[0][0].bias is None
    assert model.classifier[2].p == 0.2


def test_init_follows_torchvision(small: ArchSpec) -> None:
    torch.manual_seed(0)
    model = build_model(small)
    assert torch.all(model.features[0][1].weight == 1) and torch.all(model.features[0][1].bias == 0)
    assert torch.all(model.classifier[0].bias == 0)
    assert abs(model.classifier[0].weight.std().item() - 0.01) < 0.001


# --- one enumeration of units -------------------------------------------------------------------------------


def _unit_specs(large: ArchSpec, small: ArchSpec) -> list[ArchSpec]:
    tiny_small = replace(small, resolution=72, num_classes=10)  # 72 px: odd sizes on the way (9 -> 5 -> 3)
    return [
        replace(large, resolution=64),
        tiny_small,
        replace(tiny_small, width=0.75),
        child_spec(tiny_small, "out7-8", 40),  # block 7 without an add although 40 -> 40 at stride 1
        child_spec(tiny_small, "exp3", 24),  # expansion conv kept where exp == in
    ]


@pytest.mark.slow
def test_units_give_the_model_the_counts_the_keys_and_the_profile(large: ArchSpec, small: ArchSpec) -> None:
    """The builder, the counts, the latency-table keys and the profile all come from `spec_units`: they agree
    unit by unit, and with the model's own modules and the shapes a forward pass sees."""
    specs = _unit_specs(large, small)
    assert specs[3].blocks[6].residual is False and specs[4].blocks[2].expand is True
    for spec in specs:
        units = spec_units(spec)
        model = build_model(spec).eval()
        assert len(units) == len(model.features) + 1 == len(spec.blocks) + 3
        assert [u.kind for u in units] == ["stem"] + ["bneck"] * len(spec.blocks) + ["last_conv", "classifier"]
        owners = {key: [u.label for u in units if any(key.startswith(f"{m}.") for m in unit_modules(u))]
                  for key in model.state_dict()}
        assert all(len(labels) == 1 for labels in owners.values()), owners  # every tensor in exactly one unit
        modules = [model.head() if isinstance(u, ClassifierUnit) else model.get_submodule(unit_modules(u)[0])
                   for u in units]
        shapes: dict[int, tuple] = {}

        def record(i: int, args: tuple, out: torch.Tensor) -> None:
            shapes.setdefault(i, (tuple(args[0].shape), tuple(out.shape)))

        hooks = [(model.avgpool if isinstance(u, ClassifierUnit) else m).register_forward_hook(
            lambda _m, args, out, i=i: record(i, args, out)) for i, (u, m) in enumerate(zip(units, modules))]
        with torch.no_grad():
            model(torch.zeros(1, 3, spec.resolution, spec.resolution))
        for hook in hooks:
            hook.remove()
        keys = spec_keys(spec)
        profile = profile_model(model)
        assert [label for label, _ in keys] == [u.label for u in units] == [r.block for r in profile.rows]
        for i, (unit, module, (_, key), row) in enumerate(zip(units, modules, keys, profile.rows)):
            assert key == BlockKey.of(unit) and BlockKey.of(key.unit()) == key, key.id
            assert unit_params(unit) == count_params(module) == key.params == count_params(key.module()) \
                == row.params, key.id
            assert unit_macs(unit) == row.macs, key.id  # arithmetic == fvcore's conv + linear count
            seen_in, seen_out = shapes[i]
            assert seen_in == key.input_shape(1) == (1, unit.in_channels, unit.resolution, unit.resolution)
            if not isinstance(unit, ClassifierUnit):
                assert seen_out == (1, unit.out_channels, unit.out_resolution, unit.out_resolution), key.id
            if isinstance(unit, BneckUnit):
                assert module.use_res_connect is unit.config.residual is key.residual
                assert key.module().use_res_connect is key.residual
        assert spec_params(spec) == count_params(model) == profile.params
        assert spec_macs(spec) == profile.macs
    child_key = dict(spec_keys(specs[3]))["bneck 7"]
    assert child_key.id.endswith(" res0") and not dict(spec_keys(specs[1]))["bneck 8"].id.endswith("res1")
