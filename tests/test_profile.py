"""Profiles: the paper's MAdds and fvcore's totals exactly, per-block rows, latency fields."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mnv3_search import ArchSpec, build_model, count_params
from mnv3_search.latency import TimingPolicy, make_backend
from mnv3_search.model.counts import spec_macs, spec_params
from mnv3_search.profile import profile_model
from mnv3_search.report.frames import PROFILE_COLUMNS, profile_frame

FAST = TimingPolicy(warmup_seconds=0.0, min_repeats=3, max_repeats=5, max_seconds=0.01)


@pytest.mark.parametrize(
    "variant, width, madds_m, madds, fvcore_total",
    [("large", 1.0, 216.6, 216_589_760, 226_033_824), ("small", 1.0, 56.5, 56_510_400, 59_649_536),
     ("large", 0.75, 154.6, 154_560_624, None), ("small", 0.75, 43.4, 43_399_344, None)],
)
def test_published_madds_and_fvcore_totals(variant: str, width: float, madds_m: float, madds: int, fvcore_total,
                                           request) -> None:
    spec = replace(request.getfixturevalue(variant), width=width)
    model = build_model(spec)
    profile = profile_model(model)
    assert profile.macs == pytest.approx(madds_m * 1e6, rel=1e-3)
    assert profile.macs == spec_macs(spec) == madds  # fvcore and the arithmetic, exactly
    if fvcore_total is not None:
        assert profile.fvcore_total == fvcore_total
    assert profile.params == count_params(model) == spec_params(spec)


def test_rows_cover_every_block(large: ArchSpec) -> None:
    profile = profile_model(build_model(large))
    assert [r.block for r in profile.rows] == ["stem"] + [f"bneck {i}" for i in range(1, 16)] + [
        "last_conv", "classifier"]
    assert [r.output_size for r in profile.rows][:3] == ["112x112", "112x112", "56x56"]
    assert profile.rows[-2].output_size == "7x7" and profile.rows[-1].output_size == "1000"
    assert profile.rows[4].params == 10_328 and profile.rows[4].macs == 9_091_584
    assert profile.rows[-1].macs == 2_508_800  # 960*1280 + 1280*1000
    assert profile.whole is None and profile.blocks_latency_ms is None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_latency_per_block_and_whole(small: ArchSpec, backend: str) -> None:
    spec = replace(small, resolution=64, num_classes=10)
    profile = profile_model(build_model(spec), batch=2, backend=make_backend(backend, 1), policy=FAST,
                            whole_policy=FAST)
    assert profile.backend == backend and profile.threads == 1
    assert all(r.latency_ms > 0 and r.latency_p10_ms <= r.latency_ms <= r.latency_p90_ms for r in profile.rows)
    assert sum(r.latency_share for r in profile.rows) == pytest.approx(1.0)
    assert profile.whole is not None and profile.whole.repeats >= 3
    frame = profile_frame(profile)
    assert list(frame.columns) == PROFILE_COLUMNS
    assert len(frame) == len(profile.rows) + 1
    total = frame.iloc[-1]
    assert total["block"] == "total" and total["params"] == profile.params
    assert total["latency_ms"] == profile.whole.median_ms
