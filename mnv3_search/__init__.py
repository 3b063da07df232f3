"""mnv3-search: MobileNetV3 as YAML bneck tables, profiled and adapted to a latency budget."""

from .errors import CheckpointError, SpecError, UserError
from .model.build import build_model, count_params
from .spec.arch import ArchSpec, BlockConfig, BneckSpec, StemSpec, make_divisible
from .spec.yaml_io import dump_spec, load_spec, spec_from_dict, spec_to_yaml
from .prune.groups import ProposalGroup, proposal_groups
from .prune.surgery import shrink

__all__ = [
    "ArchSpec", "BlockConfig", "BneckSpec", "StemSpec", "CheckpointError", "SpecError", "UserError",
    "build_model", "count_params", "dump_spec", "load_spec", "make_divisible", "spec_from_dict", "spec_to_yaml",
    "ProposalGroup", "proposal_groups", "shrink",
]
__version__ = "0.1.0"
