"""Channel surgery: a parent spec + state_dict -> a smaller child spec + its inherited state_dict.

A pruned network is a new spec plus weights, never a mutated module graph, so the child dumps to YAML,
rebuilds with `build_model` and loads its weights with strict=True.

Which channels survive: the largest L2 norms of the producing filters (NetAdapt), summed over every
producer of a coupled set (the stem conv and each member's projection conv). Every consumer is sliced
with the same indices: the next 1x1 convs, depthwise convs, BN parameters and running statistics, SE
convs, the classifier. When SE's squeeze width (`se_width`: make_divisible(exp // 4, 8)) drops, the squeeze
channels with the largest fc1 rows (over the kept inputs) are carried. A child keeps its parent's structure:
every expansion conv and every residual add, and no new add (flags made explicit where the widths alone
would say otherwise).

Planning (which indices) and applying (slicing tensors) are separate, so callers and tests can see the
plan: `plan_shrink` returns a `ShrinkPlan` holding the kept indices and the slicing operations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Mapping, Optional, Union

import torch

from ..errors import UserError
from ..model.layout import BN_TENSORS, HIDDEN_LINEAR, OUTPUT_LINEAR, block_keys, last_conv_prefix, stem_prefix
from .groups import COUPLED, EXPANSION, HIDDEN, LAST_CONV, ProposalGroup, find_group
from ..spec.arch import ArchSpec, BlockConfig, se_width
from ..model.weights import check_fits

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Slice:
    """Keep `index` along `dim` of tensor `key`."""

    key: str
    dim: int
    index: torch.Tensor


@dataclass(frozen=True)
class ShrinkPlan:
    """What a shrink keeps: the group's surviving channels (sorted), per SE block the surviving squeeze
    channels, the child spec and the tensor slices that turn the parent's state_dict into the child's."""

    group: ProposalGroup
    keep: int
    kept: torch.Tensor
    se_kept: Mapping[int, torch.Tensor]
    child: ArchSpec
    slices: tuple[Slice, ...]


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, ties broken by position, returned in channel order."""
    order = torch.argsort(-scores, stable=True)[:keep]
    return torch.sort(order).values


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter (dim 0) of a conv or linear weight."""
    return weight.detach().float().flatten(1).norm(dim=1)


def _conv_bn_out(prefix: str, index: torch.Tensor) -> list[Slice]:
    """Output channels of a ConvBNAct: the conv's filters and every per-channel BN tensor."""
    return [Slice(f"{prefix}.0.weight", 0, index)] + [Slice(f"{prefix}.1.{t}", 0, index) for t in BN_TENSORS]


def _exp_space(config: BlockConfig, new_exp: int, index: torch.Tensor, sd: Mapping[str, torch.Tensor],
               se_kept: dict[int, torch.Tensor]) -> list[Slice]:
    """Slices for a block's expansion channels: depthwise, SE and the projection's input."""
    keys = block_keys(config)
    slices = _conv_bn_out(keys.depthwise, index)
    if keys.se is not None:
        fc1_w = sd[f"{keys.se}.fc1.weight"].index_select(1, index)
        squeeze = se_width(new_exp)
        if squeeze < fc1_w.shape[0]:
            se_index = _top(_filter_norms(fc1_w), squeeze)
        else:
            se_index = torch.arange(fc1_w.shape[0])
        se_kept[config.index] = se_index
        slices += [
            Slice(f"{keys.se}.fc1.weight", 1, index),
            Slice(f"{keys.se}.fc1.weight", 0, se_index),
            Slice(f"{keys.se}.fc1.bias", 0, se_index),
            Slice(f"{keys.se}.fc2.weight", 0, index),
            Slice(f"{keys.se}.fc2.weight", 1, se_index),
            Slice(f"{keys.se}.fc2.bias", 0, index),
        ]
    slices.append(Slice(f"{keys.project}.0.weight", 1, index))
    return slices


def _check_keep(group: ProposalGroup, keep: int) -> None:
    step = group.step
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise UserError(f"keep for group {group.name} must be an integer channel count, got {keep!r}")
    if keep > group.channels:
        raise UserError(f"keep {keep} for group {group.name} is more than its current {group.channels} channels; "
                        f"surgery only shrinks: choose at most {group.channels}")
    if keep < step:
        raise UserError(f"keep {keep} for group {group.name} is below the step of {step} channels; "
                        f"keep at least {step}")
    if keep != group.channels and keep % step:
        raise UserError(f"keep {keep} for group {group.name} is not a multiple of the step {step}; "
                        f"choose one of {', '.join(map(str, group.keep_options()[:6]))}, ...")


def _child_spec(spec: ArchSpec, group: ProposalGroup, keep: int) -> ArchSpec:
    """The parent with the group's width set to `keep`; expand flags made explicit where exp == in so a
    block never loses (or gains) its trained expansion conv, and residual flags carried over so no block
    gains an add when its input and output become equal (ArchSpec drops a flag that repeats the rule)."""
    configs = list(spec.block_configs())
    stem, blocks = spec.stem, list(spec.blocks)
    last_conv, hidden = spec.last_conv, spec.hidden
    if group.kind == EXPANSION:
        (i,) = group.producers
        blocks[i - 1] = replace(blocks[i - 1], exp=keep)
    elif group.kind == COUPLED:
        for p in group.producers:
            if p == 0:
                stem = replace(stem, out=keep)
            else:
                blocks[p - 1] = replace(blocks[p - 1], out=keep)
        for i in group.exp_blocks:
            blocks[i - 1] = replace(blocks[i - 1], exp=keep)
    elif group.kind == LAST_CONV:
        last_conv = keep
    elif group.kind == HIDDEN:
        hidden = keep
    in_channels = stem.out
    for n, (block, config) in enumerate(zip(blocks, configs)):
        has = config.expand_conv
        blocks[n] = replace(block, expand=None if has == (block.exp != in_channels) else has,
                            residual=config.residual)
        in_channels = block.out
    return replace(spec, stem=stem, blocks=tuple(blocks), last_conv=last_conv, hidden=hidden)


def child_spec(spec: ArchSpec, group: Union[str, ProposalGroup], keep: int, step: int = 8) -> ArchSpec:
    """The child's spec alone (no weights): what NetAdapt prices with the latency table before any surgery."""
    spec = spec.scaled()
    group = find_group(spec, group, step)
    _check_keep(group, keep)
    return _child_spec(spec, group, keep)


def plan_shrink(spec: ArchSpec, state_dict: Mapping[str, torch.Tensor], group: Union[str, ProposalGroup],
                keep: int, step: int = 8, scores: Optional[torch.Tensor] = None) -> ShrinkPlan:
    """Decide which channels of `group` survive and how every tensor is sliced. Survivors: the largest
    `scores` (one per channel of the group, an importance estimator's: prune/importance.py) when given, else the
    largest L2 norms of the producing filters (NetAdapt)."""
    spec = spec.scaled()
    group = find_group(spec, group, step)
    _check_keep(group, keep)
    if scores is not None and tuple(scores.shape) != (group.channels,):
        raise ValueError(f"scores for group {group.name}: shape {tuple(scores.shape)}, expected ({group.channels},)")

    def top(norms: torch.Tensor) -> torch.Tensor:
        return _top(norms if scores is None else scores.detach().double(), keep)

    sd = state_dict
    configs = list(spec.block_configs())
    se_kept: dict[int, torch.Tensor] = {}
    slices: list[Slice] = []
    if group.kind == EXPANSION:
        config = configs[group.producers[0] - 1]
        prefix = block_keys(config).expand
        assert prefix is not None
        kept = top(_filter_norms(sd[f"{prefix}.0.weight"]))
        slices += _conv_bn_out(prefix, kept)
        slices += _exp_space(config, keep, kept, sd, se_kept)
    elif group.kind == COUPLED:
        producers = [stem_prefix() if p == 0 else block_keys(configs[p - 1]).project for p in group.producers]
        norms = sum(_filter_norms(sd[f"{prefix}.0.weight"]) for prefix in producers)
        assert isinstance(norms, torch.Tensor)
        kept = top(norms)
        for prefix in producers:
            slices += _conv_bn_out(prefix, kept)
        members = set(group.producers)
        for config in configs:
            if config.index - 1 not in members:
                continue
            keys = block_keys(config)
            if keys.expand is not None:
                slices.append(Slice(f"{keys.expand}.0.weight", 1, kept))
            else:
                slices += _exp_space(config, keep, kept, sd, se_kept)
        if len(configs) in members:
            slices.append(Slice(f"{last_conv_prefix(spec)}.0.weight", 1, kept))
    elif group.kind == LAST_CONV:
        prefix = last_conv_prefix(spec)
        kept = top(_filter_norms(sd[f"{prefix}.0.weight"]))
        slices += _conv_bn_out(prefix, kept)
        slices.append(Slice(f"{HIDDEN_LINEAR}.weight", 1, kept))
    else:
        kept = top(_filter_norms(sd[f"{HIDDEN_LINEAR}.weight"]))
        slices += [Slice(f"{HIDDEN_LINEAR}.weight", 0, kept), Slice(f"{HIDDEN_LINEAR}.bias", 0, kept),
                   Slice(f"{OUTPUT_LINEAR}.weight", 1, kept)]
    child = _child_spec(spec, group, keep)
    return ShrinkPlan(group=group, keep=keep, kept=kept, se_kept=se_kept, child=child, slices=tuple(slices))


def apply_plan(state_dict: Mapping[str, torch.Tensor], plan: ShrinkPlan) -> StateDict:
    """The child's state_dict: the parent's tensors with the plan's slices taken (copies, never views)."""
    sliced: StateDict = {}
    for s in plan.slices:
        sliced[s.key] = sliced.get(s.key, state_dict[s.key]).index_select(s.dim, s.index)
    return {k: sliced[k].contiguous() if k in sliced else v.detach().clone() for k, v in state_dict.items()}


@lru_cache(maxsize=16)
def _expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of build_model(spec), built once per spec on the meta device (no memory, no init)."""
    from ..model.build import build_model

    with torch.device("meta"):
        model = build_model(spec)
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _check_state_dict(spec: ArchSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Shapes must fit the spec before slicing, or the slices would silently mean something else."""
    check_fits(state_dict, _expected_shapes(spec), "state_dict given to shrink", spec.name)


def shrink(spec: ArchSpec, state_dict: Mapping[str, torch.Tensor], group: Union[str, ProposalGroup], keep: int,
           step: int = 8, scores: Optional[torch.Tensor] = None) -> tuple[ArchSpec, StateDict]:
    """Shrink `group` (a ProposalGroup or its name) to `keep` channels.

    Returns the child spec (width 1.0, concrete channels) and its state_dict, which loads with strict=True
    into build_model(child). keep must be a multiple of `step`, at least `step` and at most the current
    width (keeping the current width returns an unchanged copy).
    """
    _check_state_dict(spec, state_dict)
    plan = plan_shrink(spec, state_dict, group, keep, step, scores)
    return plan.child, apply_plan(state_dict, plan)
