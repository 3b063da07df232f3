"""The one training recipe and the scoring every part of the tool uses, on the chosen device.

`Recipe` is the recipe (SGD with Nesterov momentum 0.9, weight decay 4e-5 off BN and biases, label smoothing
0.1, BN momentum 0.1 while training); `Trainer` steps it on one model, resumably. `train` is the loop over a
Trainer that seed training, the final training, explore's trials and `mnv3-search train` run (a learning-rate
schedule, constant or cosine, periodic top-1 evaluation on the holdout and a `report(step, accuracy)`
callback, which stops a run by returning True or by raising: Optuna's TrialPruned passes straight through).
NetAdapt's proposal fine-tunes step a Trainer themselves (netadapt/evaluate.py), a rung at a time, carrying
its `state()` from process to process.

Repeatable: the seed fixes dropout (torch.manual_seed) and the batch order (a torch.Generator), so the
same call on the same machine and thread count gives the same weights.

BatchNorm: the model's BN momentum (0.01, for ImageNet-length runs) barely moves the running statistics
in a few hundred steps, so training uses `bn_momentum` (0.1) and puts the model's value back afterwards.
After surgery the statistics of the surviving channels still describe the parent: `refresh_bn`
re-estimates them from training batches before the child is scored.

Device: training, scoring (`evaluate`, `holdout_metrics`), BN refresh and Taylor importance run on `device`
(cpu, cuda or auto); when not given, on $MNV3_SEARCH_DEVICE, which the CLI's --device sets so that worker
processes it starts train where it does (else cpu). Each resolves it here (`resolve_device`) and moves the
model there and back (`placed`, `Trainer.close`): checkpoints, surgery and latency (on the table's backend)
never see a GPU tensor.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, TypeVar

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


def resolve_device(device: "str | torch.device | None" = None) -> torch.device:
    """`device` (or $MNV3_SEARCH_DEVICE, else cpu) as a torch.device; cuda without a GPU is a UserError."""
    if isinstance(device, torch.device):
        return device
    name = device or os.environ.get(DEVICE_ENV) or "cpu"
    if name not in DEVICES:
        raise UserError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch here (torch.cuda.is_available() is "
                        f"False; torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device(name)


def device_of(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def placed(model: nn.Module, device: "str | torch.device | None" = None) -> Iterator[torch.device]:
    """`model` on the chosen device for the block, then back where it was: a model a Trainer is training stays
    on the device, a model from a checkpoint or surgery goes back to the CPU. Yields the device, for the
    batches."""
    target = resolve_device(device)
    home = device_of(model)
    model.to(target)
    try:
        yield target
    finally:
        if device_of(model) != home:  # compared as placed: "cuda" is where a model on cuda:0 already is
            model.to(home)


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
def evaluate(model: nn.Module, dataset: Dataset, split: Split, batch_size: int = 500,
             device: "str | torch.device | None" = None) -> float:
    """Top-1 accuracy in eval mode (running BN statistics, no dropout), on the chosen device."""
    was_training = model.training
    model.eval()
    correct = 0
    with placed(model, device) as target:
        for x, y in batches(dataset, split, batch_size):
            correct += int((model(x.to(target)).argmax(dim=1).cpu() == y).sum())
    model.train(was_training)
    return correct / max(1, len(split))


@torch.no_grad()
def holdout_metrics(model: nn.Module, dataset: Dataset, batch_size: int = 1000,
                    device: "str | torch.device | None" = None) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy (no label smoothing) on the holdout, in eval mode, on the chosen
    device: how NetAdapt scores a seed and its proposals.

    Large batches in channels-last layout: on CPU this runs ~3x faster than the default layout, so a
    1,000-image holdout costs about as much as one or two training steps."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with placed(model, device) as target:
        for x, y in batches(dataset, dataset.holdout, batch_size):
            y = y.to(target)
            logits = model(x.contiguous(memory_format=torch.channels_last).to(target))
            correct += int((logits.argmax(dim=1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    model.train(was_training)
    return correct / max(1, n), loss / max(1, n)


@torch.no_grad()
def refresh_bn(model: nn.Module, dataset: Dataset, num_batches: int = 20, batch_size: int = 128,
               seed: int = 0, device: "str | torch.device | None" = None) -> None:
    """Re-estimate every BN layer's running mean/var as a plain average over `num_batches` training
    batches (weights untouched), on the chosen device: after surgery, or after training with a different
    momentum."""
    layers = bn_layers(model)
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with placed(model, device) as target:
        for n, (x, _) in enumerate(batches(dataset, dataset.train, batch_size, shuffle=True, generator=generator,
                                           drop_last=len(dataset.train) >= batch_size)):
            if n >= num_batches:
                break
            model(x.to(target))
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


@dataclass(frozen=True)
class Recipe:
    """The training recipe, built in this one place for every training of the tool: SGD with Nesterov
    momentum, weight decay off BN and biases (1-D parameters), label smoothing, and a BN momentum while
    training (None keeps the model's)."""

    weight_decay: float = 4e-5
    momentum: float = 0.9
    label_smoothing: float = 0.1
    bn_momentum: Optional[float] = 0.1

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.SGD:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
        return torch.optim.SGD([{"params": decay, "weight_decay": self.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=self.momentum,
                               nesterov=self.momentum > 0)

    def loss(self) -> nn.CrossEntropyLoss:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)


RECIPE = Recipe()


def _cpu(value: Any) -> Any:
    """`value` with every tensor in it on the CPU: a saved training state loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class Trainer:
    """The recipe's SGD steps on one model on the chosen device, resumable.

    Made, it seeds dropout (torch.manual_seed) and the batch order, moves the model to the device and sets
    the recipe's BN momentum. `run_to(step)` trains to a step count (the learning rate of each step by
    `schedule` over `steps`, after `warmup`); `state()` / `restore()` carry the step, optimizer, data order
    and RNG, on the CPU, so a run split across processes repeats an uninterrupted one exactly. `close()`
    puts the model's BN momentum back and the model on the CPU, where checkpoints, surgery and latency work.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, *, lr: float, batch_size: int, seed: int = 0,
                 steps: int = 0, schedule: str = "constant", warmup: int = 0, recipe: Recipe = RECIPE,
                 device: "str | torch.device | None" = None) -> None:
        if steps < 0:
            raise UserError(f"steps must be >= 0, got {steps}")
        if batch_size < 2:
            raise UserError(f"batch size must be at least 2 (BatchNorm needs more than one image), got {batch_size}")
        if schedule not in ("cosine", "constant"):
            raise UserError(f"unknown learning-rate schedule {schedule!r}; use cosine or constant")
        if not lr > 0:
            raise UserError(f"learning rate must be > 0, got {lr}")
        self.model, self.dataset = model, dataset
        self.lr, self.steps, self.schedule = lr, steps, schedule
        self.warmup = min(warmup, steps // 4)  # a short run still reaches its peak learning rate
        self.device = resolve_device(device)
        self.step, self.epoch = 0, 0
        torch.manual_seed(seed)  # dropout
        model.to(self.device)
        self.optimizer = recipe.optimizer(model, lr)
        self.loss_fn = recipe.loss()
        self._layers = bn_layers(model)
        self._saved_momentum = [m.momentum for m in self._layers]
        if recipe.bn_momentum is not None:
            for m in self._layers:
                m.momentum = recipe.bn_momentum
        self._batches = endless_batches(dataset, batch_size, torch.Generator().manual_seed(seed))

    def advance(self) -> tuple[torch.Tensor, int]:
        """One step (the model in training mode); returns its loss and the images it saw."""
        self.epoch, x, y = next(self._batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(self.step, self.steps, self.lr, self.schedule, self.warmup)
        loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss, len(y)

    def run_to(self, step: int) -> None:
        self.model.train()
        while self.step < step:
            self.advance()

    def state(self) -> dict[str, Any]:
        state = {"step": self.step, "optimizer": _cpu(self.optimizer.state_dict()), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # dropout draws from the GPU's generator there
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # onto the parameters' device
        for _ in range(int(state["step"])):  # the same batches come next as in an uninterrupted run
            self.epoch, _, _ = next(self._batches)
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def close(self) -> None:
        """The model's own BN momentum back, and the model on the CPU."""
        for m, value in zip(self._layers, self._saved_momentum):
            m.momentum = value
        self.model.to("cpu")


def train(model: nn.Module, dataset: Dataset, steps: int, *, lr: float = 0.1, batch_size: int = 128, seed: int = 0,
          schedule: str = "cosine", warmup: int = 0, weight_decay: float = 4e-5, momentum: float = 0.9,
          label_smoothing: float = 0.1, eval_every: Optional[int] = None, report: Optional[Report] = None,
          progress: Optional[Progress] = None, bn_momentum: Optional[float] = 0.1,
          device: "str | torch.device | None" = None) -> TrainResult:
    """SGD (Nesterov) for `steps` steps on `device`; evaluates the holdout every `eval_every` steps and at
    the end, passing each accuracy to `report`, which stops the run by returning True. The model ends on
    the CPU in eval mode."""
    trainer = Trainer(model, dataset, lr=lr, batch_size=batch_size, seed=seed, steps=steps, schedule=schedule,
                      warmup=warmup, recipe=Recipe(weight_decay, momentum, label_smoothing, bn_momentum),
                      device=device)
    result = TrainResult(steps=0, stopped=False, seconds=0.0, images=0)
    start = time.perf_counter()
    train_seconds = 0.0
    running_loss, running_n = 0.0, 0
    model.train()
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            loss, images = trainer.advance()
            train_seconds += time.perf_counter() - t0
            result.steps, result.images = step + 1, result.images + images
            running_loss, running_n = running_loss + loss.item(), running_n + 1
            if progress is not None:
                progress(step + 1, running_loss / running_n)
            last = step + 1 == steps
            if (eval_every and (step + 1) % eval_every == 0) or last:
                accuracy = evaluate(model, dataset, dataset.holdout, device=trainer.device)
                model.train()
                result.history.append({
                    "step": step + 1, "epoch": trainer.epoch + 1, "lr": trainer.optimizer.param_groups[0]["lr"],
                    "train_loss": running_loss / running_n, "holdout_accuracy": accuracy,
                    "seconds": time.perf_counter() - start,
                    "images_per_s": result.images / train_seconds if train_seconds else 0.0,
                })
                running_loss, running_n = 0.0, 0
                if report is not None and report(step + 1, accuracy):
                    result.stopped = not last
                    break
    finally:
        trainer.close()
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
