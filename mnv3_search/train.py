"""Fine-tuning and evaluation: short fine-tunes for NetAdapt proposals, long cosine runs for seeds.

One loop (`train`) serves both: a fixed number of SGD steps over shuffled mini-batches, a learning-rate
schedule (constant or cosine), periodic top-1 evaluation on the holdout and a `report(step, accuracy)`
callback. The callback can stop a run early by returning True, or by raising (Optuna's TrialPruned
passes straight through), so a study's pruner can drop hopeless proposals.

Repeatable: the seed fixes dropout (torch.manual_seed) and the batch order (a torch.Generator), so the
same call on the same machine and thread count gives the same weights.

BatchNorm: the model's BN momentum (0.01, for ImageNet-length runs) barely moves the running statistics
in a few hundred steps, so training uses `bn_momentum` (0.1) and puts the model's value back afterwards.
After surgery the statistics of the surviving channels still describe the parent: `refresh_bn`
re-estimates them from training batches before the child is scored.

Device: training runs on `device` (cpu, cuda or auto); when not given, on $MNV3_SEARCH_DEVICE, which the
CLI's --device sets so that worker processes it starts train where it does (else cpu). The model goes back
to the CPU afterwards: checkpoints, surgery and latency (on the table's backend) never see a GPU tensor.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch import nn

from .data import Dataset, Split, batches
from .errors import UserError

DEVICE_ENV = "MNV3_SEARCH_DEVICE"
DEVICES = ("auto", "cpu", "cuda")

Report = Callable[[int, float], Optional[bool]]
Progress = Callable[[int, float], None]  # (step, loss) after every step


@dataclass
class TrainResult:
    """What a run did: steps taken, whether `report` stopped it, wall time and the evaluation history."""

    steps: int
    stopped: bool
    seconds: float
    images: int
    history: list[dict] = field(default_factory=list)  # one row per evaluation

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> Optional[float]:
        """The last evaluated holdout accuracy."""
        return self.history[-1]["holdout_accuracy"] if self.history else None


def resolve_device(device: Optional[str] = None) -> torch.device:
    """`device` (or $MNV3_SEARCH_DEVICE, else cpu) as a torch.device; cuda without a GPU is a UserError."""
    name = device or os.environ.get(DEVICE_ENV) or "cpu"
    if name not in DEVICES:
        raise UserError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch here (torch.cuda.is_available() is "
                        f"False; torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device(name)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_memory_format(model: ModuleT, memory_format: torch.memory_format) -> ModuleT:
    """`model` with its 4-D weights in `memory_format`, in place and returned for chaining: channels-last
    convolutions run ~1.6x faster on CPU (training and inference); contiguous_format turns a model back
    before its weights are saved or exported."""
    # torch's stub for Module.to has no memory_format overload, though Module.to documents and accepts it
    return model.to(memory_format=memory_format)  # type: ignore[call-overload]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer of `model`, in module order: what a training loop sets the momentum of (and
    refresh_bn re-estimates), so that every trainer touches the same layers."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, split: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (running BN statistics, no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    device = _device_of(model)
    for x, y in batches(dataset, split, batch_size):
        correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


@torch.no_grad()
def refresh_bn(model: nn.Module, dataset: Dataset, num_batches: int = 20, batch_size: int = 128,
               seed: int = 0) -> None:
    """Re-estimate every BN layer's running mean/var as a plain average over `num_batches` training
    batches (weights untouched): after surgery, or after training with a different momentum."""
    layers = bn_layers(model)
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    for n, (x, _) in enumerate(batches(dataset, dataset.train, batch_size, shuffle=True, generator=generator,
                                       drop_last=len(dataset.train) >= batch_size)):
        if n >= num_batches:
            break
        model(x.to(device))
    for m, momentum in zip(layers, saved):
        m.momentum = momentum
    model.train(was_training)


def endless_batches(dataset: Dataset, batch_size: int, generator: torch.Generator
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, x, y) from the training split endlessly, reshuffled each epoch by `generator`; full batches
    only (BN needs > 1 sample) unless the split is smaller than one batch. A trainer that steps it N times
    from the same seed sees the same batches, which is what lets a resumed fine-tune skip ahead exactly."""
    epoch = 0
    drop_last = len(dataset.train) >= batch_size
    while True:
        for x, y in batches(dataset, dataset.train, batch_size, shuffle=True, generator=generator,
                            drop_last=drop_last):
            yield epoch, x, y
        epoch += 1


def _lr_at(step: int, steps: int, lr: float, schedule: str, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


def train(model: nn.Module, dataset: Dataset, steps: int, *, lr: float = 0.1, batch_size: int = 128, seed: int = 0,
          schedule: str = "cosine", warmup: int = 0, weight_decay: float = 4e-5, momentum: float = 0.9,
          label_smoothing: float = 0.1, eval_every: Optional[int] = None, report: Optional[Report] = None,
          progress: Optional[Progress] = None, bn_momentum: Optional[float] = 0.1,
          device: Optional[str] = None) -> TrainResult:
    """SGD (Nesterov) for `steps` steps on `device`; evaluates the holdout every `eval_every` steps and at
    the end, passing each accuracy to `report`, which stops the run by returning True."""
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if batch_size < 2:
        raise UserError(f"batch size must be at least 2 (BatchNorm needs more than one image), got {batch_size}")
    if schedule not in ("cosine", "constant"):
        raise UserError(f"unknown learning-rate schedule {schedule!r}; use cosine or constant")
    if not lr > 0:
        raise UserError(f"learning rate must be > 0, got {lr}")
    warmup = min(warmup, steps // 4)  # a short run still reaches its peak learning rate
    target = resolve_device(device)
    torch.manual_seed(seed)
    model.to(target)
    generator = torch.Generator().manual_seed(seed)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum,
                                nesterov=momentum > 0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    layers = bn_layers(model)
    saved = [m.momentum for m in layers]
    if bn_momentum is not None:
        for m in layers:
            m.momentum = bn_momentum
    result = TrainResult(steps=0, stopped=False, seconds=0.0, images=0)
    start = time.perf_counter()
    train_seconds = 0.0
    running_loss, running_n, epoch = 0.0, 0, 0
    model.train()
    batches_iter = endless_batches(dataset, batch_size, generator)
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            epoch, x, y = next(batches_iter)
            x, y = x.to(target, non_blocking=True), y.to(target, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, schedule, warmup)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_seconds += time.perf_counter() - t0
            result.steps, result.images = step + 1, result.images + len(y)
            running_loss, running_n = running_loss + loss.item(), running_n + 1
            if progress is not None:
                progress(step + 1, running_loss / running_n)
            last = step + 1 == steps
            if (eval_every and (step + 1) % eval_every == 0) or last:
                accuracy = evaluate(model, dataset, dataset.holdout)
                model.train()
                result.history.append({
                    "step": step + 1, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": running_loss / running_n, "holdout_accuracy": accuracy,
                    "seconds": time.perf_counter() - start,
                    "images_per_s": result.images / train_seconds if train_seconds else 0.0,
                })
                running_loss, running_n = 0.0, 0
                if report is not None and report(step + 1, accuracy):
                    result.stopped = not last
                    break
    finally:
        for m, value in zip(layers, saved):
            m.momentum = value
        model.to("cpu")
        model.eval()
        result.seconds = time.perf_counter() - start
    return result


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    n = len(dataset.train)
    return max(1, n // batch_size if n >= batch_size else 1)


def fine_tune(model: nn.Module, dataset: Dataset, steps: int, *, lr: float = 0.01, **kwargs) -> TrainResult:
    """Short-term fine-tune of a pruned child (NetAdapt's T steps): small constant learning rate."""
    kwargs.setdefault("schedule", "constant")
    return train(model, dataset, steps, lr=lr, **kwargs)


def train_epochs(model: nn.Module, dataset: Dataset, epochs: int, *, batch_size: int = 128, **kwargs) -> TrainResult:
    """Long-term training: `epochs` passes over the training split with a cosine schedule, evaluating
    the holdout after every epoch."""
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    per_epoch = steps_per_epoch(dataset, batch_size)
    kwargs.setdefault("eval_every", per_epoch)
    return train(model, dataset, epochs * per_epoch, batch_size=batch_size, **kwargs)
