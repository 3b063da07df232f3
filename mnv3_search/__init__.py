"""mnv3-search: MobileNetV3 as YAML bneck tables, profiled and adapted to a latency budget.

The names below are imported on first use (PEP 562), so `import mnv3_search` (and `mnv3-search --help`)
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": ".errors", "SpecError": ".errors", "UserError": ".errors",
    "build_model": ".model.build", "count_params": ".model.build",
    "ArchSpec": ".spec.arch", "BlockConfig": ".spec.arch", "BneckSpec": ".spec.arch", "StemSpec": ".spec.arch",
    "make_divisible": ".spec.arch",
    "dump_spec": ".spec.yaml_io", "load_spec": ".spec.yaml_io", "spec_from_dict": ".spec.yaml_io",
    "spec_to_yaml": ".spec.yaml_io",
    "ProposalGroup": ".prune.groups", "proposal_groups": ".prune.groups", "shrink": ".prune.surgery",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .errors import CheckpointError, SpecError, UserError
    from .model.build import build_model, count_params
    from .prune.groups import ProposalGroup, proposal_groups
    from .prune.surgery import shrink
    from .spec.arch import ArchSpec, BlockConfig, BneckSpec, StemSpec, make_divisible
    from .spec.yaml_io import dump_spec, load_spec, spec_from_dict, spec_to_yaml


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
