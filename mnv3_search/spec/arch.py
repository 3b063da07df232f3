"""Typed, frozen description of a MobileNetV3-style network and its YAML form.

The ArchSpec is the single source of truth: every model the tool builds, prunes or reports has a spec
that round-trips through YAML (`dump_spec` then `load_spec` gives an equal spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

from ..errors import SpecError

NONLINEARITIES = ("RE", "HS")
MAX_CHANNELS = 8192
MAX_KERNEL = 11
MAX_RESOLUTION = 4096
MAX_CLASSES = 100_000


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round to the nearest multiple of `divisor` (at least `divisor`), going up one step if rounding
    lost more than 10 %: the rule of the paper, TF-slim, timm and torchvision."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def se_width(exp: int) -> int:
    """Squeeze width of a block's SE module: make_divisible(exp // 4, 8), as torchvision and the paper."""
    return make_divisible(exp // 4, 8)


def default_residual(stride: int, in_channels: int, out_channels: int) -> bool:
    """The paper's rule, used when a row does not say: a block adds its input exactly when it can."""
    return stride == 1 and in_channels == out_channels


@dataclass(frozen=True)
class StemSpec:
    """The first conv: k x k, stride s, 3 -> out channels, BN, NL."""

    out: int = 16
    kernel: int = 3
    stride: int = 2
    nl: str = "HS"


@dataclass(frozen=True)
class BneckSpec:
    """One row of the paper's bneck table.

    `expand` says whether the 1x1 expansion conv exists. None means the paper's rule: present exactly
    when exp differs from the block's input channels. Pruning may shrink exp to equal the input while
    keeping the trained expansion conv, and then says so with expand=True.

    `residual` says whether the block adds its input to its output. None means the paper's rule: exactly
    when stride is 1 and the input width equals the output width. Pruning may make a stride-1 block's
    input and output equal without the parent's add, and then says so with residual=False. An ArchSpec
    stores None wherever the flag would repeat the rule, so equal networks compare equal.
    """

    kernel: int
    exp: int
    out: int
    se: bool
    nl: str
    stride: int
    expand: Optional[bool] = None
    residual: Optional[bool] = None

    def has_expand_conv(self, in_channels: int) -> bool:
        return self.exp != in_channels if self.expand is None else self.expand

    def has_residual(self, in_channels: int) -> bool:
        return default_residual(self.stride, in_channels, self.out) if self.residual is None else self.residual


@dataclass(frozen=True)
class BlockConfig:
    """A bneck row with everything the builder needs resolved: input channels, SE width, residual."""

    index: int  # 1-based, as in the paper's table and torchvision's features.N
    in_channels: int
    kernel: int
    exp: int
    out: int
    se: bool
    nl: str
    stride: int
    expand_conv: bool
    se_channels: int
    residual: bool


@dataclass(frozen=True)
class ArchSpec:
    """A whole network: stem, bneck rows, last 1x1 conv and the classifier head."""

    name: str
    blocks: tuple[BneckSpec, ...]
    stem: StemSpec = field(default_factory=StemSpec)
    last_conv: int = 960
    last_nl: str = "HS"
    hidden: int = 1280
    head_nl: str = "HS"
    num_classes: int = 1000
    dropout: float = 0.2
    resolution: int = 224
    width: float = 1.0

    def __post_init__(self) -> None:
        # a residual flag that repeats the rule is dropped: one network, one spec (and one YAML form)
        blocks, in_channels = list(self.blocks), self.stem.out
        for n, block in enumerate(blocks):
            if block.residual is not None and block.residual == default_residual(block.stride, in_channels,
                                                                                 block.out):
                blocks[n] = replace(block, residual=None)
            in_channels = block.out
        if blocks != list(self.blocks):
            object.__setattr__(self, "blocks", tuple(blocks))

    @property
    def total_stride(self) -> int:
        stride = self.stem.stride
        for block in self.blocks:
            stride *= block.stride
        return stride

    def scaled(self) -> "ArchSpec":
        """The concrete spec at width 1.0 (paper/TF/timm width semantics).

        Each output channel count becomes make_divisible(c * width); each expansion size becomes
        make_divisible(exp / in * scaled_in), keeping the table's expansion ratio; the classifier's
        hidden width stays fixed. This reproduces the paper's 0.75 rows.
        """
        if self.width == 1.0:
            return self
        m = self.width
        stem = replace(self.stem, out=make_divisible(self.stem.out * m))
        blocks = []
        in_orig, in_scaled = self.stem.out, stem.out
        for block in self.blocks:
            out = make_divisible(block.out * m)
            exp = make_divisible(block.exp / in_orig * in_scaled)
            expand = block.expand if block.expand is not None else (block.exp != in_orig)
            residual = block.has_residual(in_orig)
            blocks.append(replace(block, exp=exp, out=out, expand=None if expand == (exp != in_scaled) else expand,
                                  residual=residual))  # __post_init__ drops it where the rule agrees
            in_orig, in_scaled = block.out, out
        return replace(
            self, stem=stem, blocks=tuple(blocks), last_conv=make_divisible(self.last_conv * m), width=1.0
        )

    def block_configs(self) -> Iterator[BlockConfig]:
        """Resolved rows of the concrete (width-scaled) network."""
        spec = self.scaled()
        in_channels = spec.stem.out
        for index, block in enumerate(spec.blocks, start=1):
            yield BlockConfig(
                index=index,
                in_channels=in_channels,
                kernel=block.kernel,
                exp=block.exp,
                out=block.out,
                se=block.se,
                nl=block.nl,
                stride=block.stride,
                expand_conv=block.has_expand_conv(in_channels),
                se_channels=se_width(block.exp),
                residual=block.has_residual(in_channels),
            )
            in_channels = block.out

    def with_overrides(self, *, resolution: Optional[int] = None, width: Optional[float] = None,
                       num_classes: Optional[int] = None, where: str = "option") -> "ArchSpec":
        """A copy with command-line overrides applied and validated."""
        spec = self
        if resolution is not None:
            spec = replace(spec, resolution=resolution)
        if width is not None:
            spec = replace(spec, width=width)
        if num_classes is not None:
            spec = replace(spec, num_classes=num_classes)
        validate_spec(spec, where)
        return spec


def validate_spec(spec: ArchSpec, where: str) -> None:
    """Whole-network checks that single fields cannot make: width, resolution vs strides, scaled widths."""
    if not spec.width > 0:
        raise SpecError(f"{where}: width must be > 0, got {spec.width}; use e.g. 1.0 or 0.75")
    in_channels = spec.stem.out
    for index, block in enumerate(spec.blocks, start=1):
        if block.residual and not default_residual(block.stride, in_channels, block.out):
            raise SpecError(
                f"{where}: bneck row {index}, field 'residual': true needs stride 1 and equal input and output "
                f"widths, but this row has stride {block.stride} and {in_channels} -> {block.out} channels; "
                f"remove 'residual' or set it to false"
            )
        in_channels = block.out
    if spec.resolution < spec.total_stride:
        raise SpecError(
            f"{where}: resolution {spec.resolution} is too small for this network, which downsamples by "
            f"{spec.total_stride}; use a resolution of at least {spec.total_stride}"
        )
    if spec.resolution > MAX_RESOLUTION:
        raise SpecError(f"{where}: resolution {spec.resolution} is absurdly large; use at most {MAX_RESOLUTION}")
    scaled = spec.scaled()
    widths = [scaled.stem.out, scaled.last_conv] + [c for b in scaled.blocks for c in (b.exp, b.out)]
    if max(widths) > MAX_CHANNELS:
        raise SpecError(
            f"{where}: width {spec.width} makes a layer {max(widths)} channels wide, over the limit of "
            f"{MAX_CHANNELS}; use a smaller width"
        )
    for config in spec.block_configs():
        if config.exp != config.in_channels and not config.expand_conv:
            raise SpecError(
                f"{where}: bneck row {config.index}: expand is false but exp {config.exp} differs from the "
                f"block's input {config.in_channels}; without an expansion conv exp must equal the input"
            )
