"""The typed, frozen description of a network (ArchSpec), its YAML form and the shipped search spaces."""

from .arch import ArchSpec, BlockConfig, BneckSpec, StemSpec, make_divisible
from .yaml_io import dump_spec, load_spec, spec_from_dict, spec_to_yaml

__all__ = ["ArchSpec", "BlockConfig", "BneckSpec", "StemSpec", "dump_spec", "load_spec", "make_divisible",
           "spec_from_dict", "spec_to_yaml"]
