"""Everything that defines a NetAdapt run, stored in run.json and in the study so workers can join."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from ..errors import UserError

SELECT_RULES = ("ratio", "accuracy")
PRUNERS = ("halving", "median", "none")


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run; running again with an equal config resumes it.

    Training settings apply to proposals' short fine-tunes (`short_steps` SGD steps at `short_lr`, holdout
    accuracy reported `reports` times so the pruner can stop hopeless ones), the seed's training when no
    weights are given (`seed_epochs`) and the final long fine-tune (`long_epochs`, cosine from `lr`).
    """

    spec_path: str
    budget: str
    schedule: str = "netadapt"
    select: str = "ratio"
    data: str = "digits"
    train_resolution: int = 32
    resolution: Optional[int] = None  # deployment resolution override
    num_classes: Optional[int] = None  # default: the dataset's
    batch_size: int = 64
    step: int = 8
    short_steps: int = 20
    short_lr: float = 0.005
    reports: int = 4
    seed_epochs: int = 15
    long_epochs: int = 5
    lr: float = 0.1
    seed: int = 0
    pruner: str = "halving"
    backend: str = "onnxruntime"
    threads: int = 1
    max_iterations: int = 200
    holdout: float = 0.15
    limit: Optional[int] = None
    weights: Optional[str] = None
    lut: Optional[str] = None

    def __post_init__(self) -> None:
        if self.select not in SELECT_RULES:
            raise UserError(f"--select {self.select!r}: use one of {', '.join(SELECT_RULES)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner {self.pruner!r}: use one of {', '.join(PRUNERS)}")
        for name in ("short_steps", "reports", "batch_size", "step", "max_iterations", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.reports > self.short_steps:
            raise UserError(f"--reports ({self.reports}) cannot exceed --short-steps ({self.short_steps})")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: unknown run setting {unknown[0]!r}; was it written by a newer mnv3-search?")
        return cls(**data)

    def differences(self, other: "RunConfig") -> list[str]:
        mine, theirs = self.as_json(), other.as_json()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
