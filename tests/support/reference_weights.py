"""torchvision's state_dict listings (copied from shared/reference) turned into random state_dicts."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"


def reference_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict with exactly the keys, dtypes and shapes torchvision's model has."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for line in (DATA / f"torchvision_mobilenet_v3_{variant}_state_dict.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, dtype, shape_text = line.split("\t")
        shape = tuple(int(v) for v in re.findall(r"\d+", shape_text))
        if dtype == "int64":
            state[key] = torch.tensor(100, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state
