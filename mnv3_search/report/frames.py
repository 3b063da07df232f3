"""Tabular outputs: profiles as pandas frames and CSV files, written atomically (or to stdout for '-')."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from ..profile import Profile

PROFILE_COLUMNS = [
    "block", "module", "in_channels", "out_channels", "kernel", "stride", "exp", "se", "nl", "output_size",
    "params", "macs", "fvcore_total", "latency_ms", "latency_p10_ms", "latency_p90_ms", "latency_share",
    "latency_statistic",
]
# counts that may be missing in some rows (a stem has no expansion): nullable integers, so the CSV says 3, not 3.0
PROFILE_INT_COLUMNS = ["in_channels", "out_channels", "kernel", "stride", "exp", "params", "macs", "fvcore_total"]


def profile_frame(profile: Profile) -> pd.DataFrame:
    """One row per block plus a `total` row; the total's latency is the whole network measured as one.

    Latency columns are medians of the runs (latency_p10_ms / latency_p90_ms their spread)."""
    frame = pd.DataFrame([asdict(r) for r in profile.rows], columns=PROFILE_COLUMNS)
    total = {"block": "total", "module": "", "in_channels": profile.rows[0].in_channels,
             "out_channels": profile.rows[-1].out_channels, "params": profile.params, "macs": profile.macs,
             "fvcore_total": profile.fvcore_total}
    if profile.whole is not None:
        total.update(latency_ms=profile.whole.median_ms, latency_p10_ms=profile.whole.p10_ms,
                     latency_p90_ms=profile.whole.p90_ms, latency_share=1.0)
    frame = pd.concat([frame, pd.DataFrame([total], columns=PROFILE_COLUMNS)], ignore_index=True)
    frame[PROFILE_INT_COLUMNS] = frame[PROFILE_INT_COLUMNS].astype("Int64")
    frame["se"] = frame["se"].astype("boolean")
    frame["latency_statistic"] = frame["latency_ms"].map(lambda v: None if pd.isna(v) else "median")
    return frame
