"""Channel importance behind one protocol: a network's groups -> one score per channel (larger: keep).

As Torch-Pruning's `Importance`, an estimator is kept apart from the groups (groups.py), the surgery
(surgery.py) and the algorithms that choose widths (the NetAdapt loop, the knapsack): they take an estimator,
so a new criterion is one class. It answers for many groups at once because a data-driven criterion (Taylor)
pays one pass over training batches for all of them.

- `Magnitude(2)`: the L2 norm of the weights producing each channel, summed over every producer of a coupled
  set (NetAdapt's criterion, surgery's default); `Magnitude(1)`: the L1 norm (the uniform-shrink baseline of
  AMC and MetaPruning).
- `BNScale`: |gamma| of the channel's BatchNorms, summed (Network Slimming).
- `Taylor`: first-order Taylor importance of the channel's BatchNorm scale and shift, accumulated over batches
  (Molchanov et al. 2019; HALP's saliency).
The classifier's hidden units have no BatchNorm: BN scale and Taylor score them by their Linear outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Dataset, batches
from ..errors import UserError
from ..model.layout import HIDDEN_LINEAR, block_keys, last_conv_prefix, stem_prefix
from ..spec.arch import ArchSpec
from .groups import COUPLED, EXPANSION, LAST_CONV, ProposalGroup

TAYLOR_BATCHES = 32  # batches Taylor importance is averaged over (7 s for Small at 32 px on one core)


@dataclass(frozen=True)
class GroupScores:
    """Per-channel importance of one group, in channel order; a width of k keeps the k largest."""

    group: ProposalGroup
    importance: np.ndarray

    def kept_importance(self, keep: int) -> float:
        return float(np.sort(self.importance)[::-1][:keep].sum())


class Importance(Protocol):
    """Scores every channel of each of `groups` of the network (`spec`, `state`)."""

    @property
    def name(self) -> str: ...

    def __call__(self, spec: ArchSpec, state: Mapping[str, torch.Tensor],
                 groups: Sequence[ProposalGroup]) -> list[GroupScores]: ...


def producer_prefixes(spec: ArchSpec, group: ProposalGroup) -> list[str]:
    """The layers whose output channels are the group's: ConvBNAct prefixes (conv at P.0, BN at P.1), or the
    classifier's hidden Linear for the hidden group."""
    configs = list(spec.scaled().block_configs())
    if group.kind == EXPANSION:
        expand = block_keys(configs[group.producers[0] - 1]).expand
        assert expand is not None, f"{group.name}: an expansion group is produced by an expansion conv"
        return [expand]
    if group.kind == COUPLED:
        return [stem_prefix() if p == 0 else block_keys(configs[p - 1]).project for p in group.producers]
    if group.kind == LAST_CONV:
        return [last_conv_prefix(spec)]
    return [HIDDEN_LINEAR]


def _weight_key(prefix: str) -> str:
    return f"{prefix}.weight" if prefix == HIDDEN_LINEAR else f"{prefix}.0.weight"


def filter_norms(weight: torch.Tensor, p: int = 2) -> torch.Tensor:
    """The Lp norm of each output filter (dim 0) of a conv or linear weight, in float32."""
    return weight.detach().float().flatten(1).norm(p=p, dim=1)


@dataclass(frozen=True)
class Magnitude:
    """Lp norm of the producing filters, summed over a coupled set's producers."""

    p: int = 2

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def channel_scores(self, spec: ArchSpec, state: Mapping[str, torch.Tensor], group: ProposalGroup
                       ) -> torch.Tensor:
        norms = [filter_norms(state[_weight_key(prefix)], self.p) for prefix in producer_prefixes(spec, group)]
        total = norms[0]
        for n in norms[1:]:
            total = total + n
        return total

    def __call__(self, spec: ArchSpec, state: Mapping[str, torch.Tensor],
                 groups: Sequence[ProposalGroup]) -> list[GroupScores]:
        return [GroupScores(g, self.channel_scores(spec, state, g).double().numpy()) for g in groups]


@dataclass(frozen=True)
class BNScale:
    """|gamma| of the channel's BatchNorms (its producers' and the depthwise convs' on it: `_own_tensors`),
    summed; the hidden group (no BatchNorm): the L1 norm of its Linear rows."""

    name: str = "bn"

    def __call__(self, spec: ArchSpec, state: Mapping[str, torch.Tensor],
                 groups: Sequence[ProposalGroup]) -> list[GroupScores]:
        found = []
        for g in groups:
            if producer_prefixes(spec, g) == [HIDDEN_LINEAR]:
                scores = filter_norms(state[_weight_key(HIDDEN_LINEAR)], 1).double()
            else:
                scores = torch.zeros(g.channels, dtype=torch.float64)
                for key, _ in _own_tensors(spec, g):
                    if key.endswith(".weight"):
                        scores += state[key].detach().double().abs()
            found.append(GroupScores(g, scores.numpy()))
        return found


def _own_tensors(spec: ArchSpec, group: ProposalGroup) -> list[tuple[str, int]]:
    """(parameter, channel dim) pairs whose slices are the group's own channels, in surgery's order: the BN
    scale and shift of its producers and of the depthwise convs that run on its channels (the block of an
    expansion; for a coupled set, its blocks without expansion conv); the hidden group's Linear rows."""
    prefixes = producer_prefixes(spec, group)
    if prefixes == [HIDDEN_LINEAR]:
        return [(f"{HIDDEN_LINEAR}.weight", 0), (f"{HIDDEN_LINEAR}.bias", 0)]
    configs = list(spec.scaled().block_configs())
    blocks = group.producers if group.kind == EXPANSION else group.exp_blocks
    prefixes += [block_keys(configs[b - 1]).depthwise for b in sorted(blocks)]
    return [(f"{p}.1.{t}", 0) for p in prefixes for t in ("weight", "bias")]


@dataclass(frozen=True)
class Taylor:
    """First-order Taylor importance per channel: the mean over training batches of (sum over the channel's
    own tensors of weight x gradient)^2, the loss change its removal would cause to first order. The network
    is in training mode (BatchNorm on batch statistics, as a fine-tune sees it) and the loss is plain
    cross-entropy, as HALP scores."""

    dataset: Dataset
    num_batches: int = TAYLOR_BATCHES
    batch_size: int = 64
    seed: int = 0
    name: str = "taylor"

    def __call__(self, spec: ArchSpec, state: Mapping[str, torch.Tensor],
                 groups: Sequence[ProposalGroup]) -> list[GroupScores]:
        return taylor_importance(spec, state, self.dataset, groups, self.num_batches, self.batch_size, self.seed)


def taylor_importance(spec: ArchSpec, state: Mapping[str, torch.Tensor], dataset: Dataset,
                      groups: Sequence[ProposalGroup], num_batches: int = TAYLOR_BATCHES, batch_size: int = 64,
                      seed: int = 0) -> list[GroupScores]:
    """`Taylor`'s scores, on the training's device (`train.placed`)."""
    from ..model.build import build_model
    from ..train import placed

    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    model.train()
    params = dict(model.named_parameters())
    tensors = [_own_tensors(spec, g) for g in groups]
    totals = [np.zeros(g.channels) for g in groups]
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    with placed(model) as device:  # the gradients are taken on the training's device
        for x, y in batches(dataset, dataset.train, batch_size, shuffle=True, generator=generator):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x.to(device)), y.to(device)).backward()
            with torch.no_grad():
                for n, pairs in enumerate(tensors):
                    score = torch.zeros(groups[n].channels, dtype=torch.float64, device=device)
                    for key, dim in pairs:
                        p = params[key]
                        assert p.grad is not None
                        wg = (p * p.grad).double()
                        score += wg.movedim(dim, 0).reshape(wg.shape[dim], -1).sum(dim=1)
                    totals[n] += (score ** 2).cpu().numpy()
            seen += 1
            if seen == num_batches:
                break
    return [GroupScores(g, t / max(seen, 1)) for g, t in zip(groups, totals)]


IMPORTANCES = ("l1", "l2", "bn", "taylor")


def make_importance(name: str, dataset: Optional[Dataset] = None, *, batch_size: int = 64,
                    seed: int = 0) -> Importance:
    """The estimator called `name` (one of `IMPORTANCES`); Taylor needs the training data."""
    if name in ("l1", "l2"):
        return Magnitude(int(name[1]))
    if name == "bn":
        return BNScale()
    if name == "taylor":
        if dataset is None:
            raise ValueError("Taylor importance needs the training data")
        return Taylor(dataset, batch_size=batch_size, seed=seed)
    raise UserError(f"--importance {name!r}: use one of {', '.join(IMPORTANCES)}")
