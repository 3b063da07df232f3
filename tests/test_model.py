"""The builder: exact published parameter counts and torchvision's layout, checked against an
independent functional forward pass written from REFERENCE §1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mnv3_search import ArchSpec, build_model, count_params
from mnv3_search.spec.arch import BlockConfig

from reference_weights import reference_state_dict

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


def _block(x: torch.Tensor, sd: dict, c: BlockConfig) -> torch.Tensor:
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
    return y + x if c.stride == 1 and c.in_channels == c.out else y


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
