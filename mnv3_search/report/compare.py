"""Side-by-side comparison of variants: specs and run folders, measured interleaved in one process.

A *variant* is what a user names on the command line: a YAML spec (a path or a shipped name, optionally
with weights), or a NetAdapt run folder, which contributes final.yaml, final.pt and the test accuracy
recorded in run.json's result. Latency is measured for all variants together with the interleaved protocol
(shuffled round-robin passes), so a burst of load on a shared host hits every variant alike and the ratios
to the baseline (the first variant) are fair. Numbers from different processes are never compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch

from ..model.counts import spec_macs, spec_params
from ..data import Dataset
from ..errors import UserError
from ..latency import Backend, InterleavedPolicy, measure_interleaved
from ..model.build import build_model
from ..netadapt.runfolder import RunFolder
from ..spec.spaces import resolve_spec_path
from ..spec.arch import ArchSpec
from ..spec.yaml_io import load_spec
from ..model.weights import check_fits, read_state_dict

# Columns of `compare --csv`, in order. Ratios are variant / baseline (the first variant); accuracy ratios
# are left empty where either accuracy is unknown.
COMPARE_COLUMNS = [
    "variant", "source", "kind", "resolution", "num_classes", "params", "macs", "latency_p25_ms",
    "latency_median_ms", "latency_p10_ms", "latency_p90_ms", "accuracy", "accuracy_source",
    "params_ratio", "macs_ratio", "latency_ratio", "accuracy_delta", "predicted_p25_ms",
]


@dataclass
class Variant:
    """One network to compare or export: its spec, weights if any, and what is known about its accuracy."""

    label: str
    source: str
    kind: str  # "spec" | "run"
    spec: ArchSpec
    state_dict: Optional[dict[str, torch.Tensor]] = None
    accuracy: Optional[float] = None
    accuracy_source: str = ""
    run: dict = field(default_factory=dict)  # run.json of a run folder

    def model(self) -> torch.nn.Module:
        model = build_model(self.spec)
        if self.state_dict is not None:
            model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def load_variant(argument: str, weights: Optional[str] = None, label: Optional[str] = None) -> Variant:
    """A run folder (final.yaml + final.pt + run.json's test accuracy) or a spec (path or shipped name).

    `weights` (a checkpoint for a spec) is checked to fit before it is used."""
    path = Path(argument)
    if path.is_dir():
        if not RunFolder.is_run(path):
            raise UserError(f"{path}: a folder but not a run folder (no run.json); give a YAML spec or a "
                            f"NetAdapt run folder such as results/<run>")
        folder = RunFolder(path)
        final = folder.final_yaml
        if not final.is_file():
            raise UserError(f"{path}: the run has not finished (no final.yaml); resume it with "
                            f"`mnv3-search netadapt --resume {path}` first")
        spec = load_spec(final)
        run = folder.read_run_json() or {}
        summary = folder.read_result()
        checkpoint = Path(weights) if weights else folder.final_pt
        state = read_state_dict(checkpoint) if checkpoint.is_file() else None
        if state is not None:
            check_fits(state, build_model(spec), str(checkpoint), str(final))
        accuracy = summary.test_accuracy if summary is not None else None
        source = "run.json test" + (", INT8" if summary is not None and summary.precision == "int8" else "")
        return Variant(label or path.resolve().name, str(path), "run", spec, state,
                       None if accuracy is None else float(accuracy), source if accuracy is not None else "", run)
    spec_path = resolve_spec_path(argument)
    spec = load_spec(spec_path)
    state = None
    if weights:
        state = read_state_dict(weights)
        check_fits(state, build_model(spec), weights, str(spec_path))
    return Variant(label or spec.name, str(spec_path), "spec", spec, state)


def unique_labels(variants: Sequence[Variant]) -> None:
    """Make labels unique (two runs of the same spec, or the same spec twice) by appending #2, #3, ..."""
    seen: dict[str, int] = {}
    for v in variants:
        n = seen.get(v.label, 0) + 1
        seen[v.label] = n
        if n > 1:
            v.label = f"{v.label}#{n}"


def evaluate_variants(variants: Sequence[Variant], dataset: Dataset, precision: str = "fp32") -> None:
    """Test accuracy on `dataset` for every variant with weights whose classifier fits the dataset; at INT8, of
    the network quantized on the dataset's training images (`quantize.int8_accuracy`)."""
    from ..train import evaluate

    for v in variants:
        if v.state_dict is None:
            continue
        if v.spec.num_classes != dataset.num_classes:
            raise UserError(f"{v.source}: the network has {v.spec.num_classes} outputs but --data "
                            f"{dataset.name} has {dataset.num_classes} classes")
        if precision == "int8":
            from ..quantize import int8_accuracy

            v.accuracy = int8_accuracy(v.model(), dataset)[0].file_accuracy
            v.accuracy_source = f"{dataset.name} test, INT8"
        else:
            v.accuracy = evaluate(v.model(), dataset, dataset.test)
            v.accuracy_source = f"{dataset.name} test"


def measure_variants(variants: Sequence[Variant], backend: Backend, batch: int = 1,
                     policy: InterleavedPolicy = InterleavedPolicy(),
                     on_pass: Optional[Callable[[int, int], None]] = None):
    """Whole networks timed interleaved in this process (p25 and median), at each spec's resolution."""
    runners = [backend.runner(v.model(), (batch, 3, v.spec.resolution, v.spec.resolution)) for v in variants]
    return measure_interleaved(runners, policy, on_pass=on_pass)


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base is None or base == 0 or (isinstance(value, float) and math.isnan(value)):
        return None
    return value / base


def compare_frame(variants: Sequence[Variant], measurements: Optional[Sequence] = None,
                  predicted_ms: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """One row per variant with COMPARE_COLUMNS; ratios relative to the first row (the baseline).
    `predicted_ms`: each variant's latency by the machine's table (calibrated p25), when asked for."""
    if not variants:
        raise UserError("nothing to compare: give at least one spec or run folder")
    rows: list[dict[str, Any]] = []  # one DataFrame record per variant: numbers, text and None
    for i, v in enumerate(variants):
        m = measurements[i] if measurements else None
        rows.append({
            "variant": v.label, "source": v.source, "kind": v.kind, "resolution": v.spec.resolution,
            "num_classes": v.spec.num_classes, "params": spec_params(v.spec), "macs": spec_macs(v.spec),
            "latency_p25_ms": m.p25_ms if m else None, "latency_median_ms": m.median_ms if m else None,
            "latency_p10_ms": m.p10_ms if m else None, "latency_p90_ms": m.p90_ms if m else None,
            "accuracy": v.accuracy, "accuracy_source": v.accuracy_source,
            "predicted_p25_ms": predicted_ms[i] if predicted_ms else None,
        })
    base = rows[0]
    for row in rows:
        row["params_ratio"] = _ratio(row["params"], base["params"])
        row["macs_ratio"] = _ratio(row["macs"], base["macs"])
        row["latency_ratio"] = _ratio(row["latency_p25_ms"], base["latency_p25_ms"])
        known = row["accuracy"] is not None and base["accuracy"] is not None
        row["accuracy_delta"] = row["accuracy"] - base["accuracy"] if known else None
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)
