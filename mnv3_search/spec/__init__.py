"""The typed, frozen description of a network (ArchSpec), its YAML form, the shipped search spaces and the
one enumeration of a network's units."""

from .arch import ArchSpec, BlockConfig, BneckSpec, StemSpec, make_divisible, se_width
from .units import Unit, spec_units
from .yaml_io import dump_spec, load_spec, spec_from_dict, spec_to_yaml

__all__ = ["ArchSpec", "BlockConfig", "BneckSpec", "StemSpec", "Unit", "dump_spec", "load_spec", "make_divisible",
           "se_width", "spec_from_dict", "spec_to_yaml", "spec_units"]
