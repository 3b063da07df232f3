"""Everything that defines a NetAdapt run, stored in run.json and in the study so workers can join."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Optional

from ..errors import UserError
from ..settings import check_choices, setting

SELECT_RULES = ("ratio", "accuracy")
EVALUATIONS = ("halving", "full")
FINALS = ("auto", "fine-tune", "retrain")
LADDERS = ("early", "geometric")  # where halving's rungs score (`RunConfig.rung_steps`)
# what a run.json written before a setting existed meant by it: such a run resumes exactly as it started
LEGACY_SETTINGS = {"ladder": "geometric", "keep": 0.5}
# per-group proposals scored by fine-tunes; one HALP-style knapsack; or NetAdapt's iterations with the knapsack's
# multi-group cut to each iteration's goal as one more proposal (iterative.py, proposals.py)
METHODS = ("netadapt", "knapsack", "hybrid")
ITERATIVE_METHODS = ("netadapt", "hybrid")  # the methods that iterate in an Optuna study (workers can join)
PRECISIONS = ("fp32", "int8")  # latency.PRECISIONS, spelled out: this module imports no torch
FP32_BACKENDS = ("torch", "torch-cuda")  # the latency backends without INT8 (latency.BACKENDS' precisions)
# which channels a cut keeps (prune/importance.py); auto: each method's own (NetAdapt's L2, HALP's Taylor)
IMPORTANCE_CHOICES = ("auto", "l1", "l2", "bn", "taylor")
# hybrid: Taylor, whose scores compare across layers as the knapsack's values must (L2 norms do not)
METHOD_IMPORTANCE = {"netadapt": "l2", "knapsack": "taylor", "hybrid": "taylor"}
# limits on how far a run goes, not on what it computes: a run stopped by --max-iterations continues with a higher one
RESUMABLE = ("max_iterations",)


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run; running again with an equal config resumes it.

    Training settings apply to proposals' short fine-tunes (`short_steps` SGD steps at `short_lr`), the
    seed's training when no weights are given (`seed_epochs`) and the final long fine-tune (`long_epochs`,
    cosine from `lr`). `evaluation`: `halving` scores every proposal at the first of `rungs` step counts
    (`rung_steps()`, placed by `ladder`) and trains the best `keep` fraction on to the next; `full` trains
    every proposal for `short_steps` (scoring it at the same step counts, for comparison). `holdout`: None
    sizes it by the data (`data.default_holdout_images`), a float a fraction of the training images, an int
    an image count. Fields declared with `setting()` are the `netadapt` command's options (settings.py).
    """

    spec_path: str
    budget: str
    # the rest in the order of `mnv3-search netadapt --help`, which makes an option of each setting()
    data: str = setting("digits")
    weights: Optional[str] = setting(None, " Else a seed is trained first.", path=True)
    schedule: str = setting(
        "netadapt", "netadapt (2.5% of the seed, x0.96 per iteration), mobilenetv3 (fixed 1%), or FIRST,DECAY.")
    # how the shape is found: NetAdapt's iterations, a knapsack (prune/knapsack.py), or the iterations with the
    # knapsack's cut as one more proposal each
    method: str = setting(
        "netadapt", "netadapt: iterations of per-group proposals, each fine-tuned briefly and scored on the holdout "
        "(minutes per iteration); knapsack: every channel scored once (--importance), one width per group "
        "chosen by a knapsack under the budget, the shape timed beside the seed and corrected until the "
        "measurement meets it (HALP-style; seconds; --select, --evaluation, --schedule and the short fine-tune "
        "options do not apply; no workers); hybrid: netadapt's iterations, each also weighing the knapsack's cut of "
        "several groups at once to the same goal as one more proposal.", choices=METHODS)
    importance: str = setting(
        "auto", "Which channels a cut keeps, and what the knapsack maximises: l1 or l2 (the producing weights' "
        "norm), bn (BatchNorm scale), taylor (first-order Taylor, over 32 training batches); auto: l2 for netadapt "
        "(NetAdapt's), taylor for knapsack (HALP's) and hybrid.", choices=IMPORTANCE_CHOICES)
    select: str = setting(
        "ratio", "ratio: max dAcc/|dLatency| (a gain scores the gain); accuracy: max holdout accuracy. Either way, "
        "accuracy differences within the holdout's standard error tie; ties go to the lower holdout loss, then the "
        "larger saving.", choices=SELECT_RULES)
    evaluation: str = setting(
        "halving", "halving: every proposal is scored after a few steps (short-steps/8 with 3 rungs), the best "
        "--keep fraction trains on, rung by rung (about half the steps); full: every proposal trains all "
        "short-steps.", choices=EVALUATIONS)
    short_steps: int = setting(20, "Fine-tune steps per proposal.", minimum=1)
    rungs: int = setting(3, "Successive-halving rungs (scored at short-steps/8, /4, /1 for 3; /4, /1 for 2).",
                         minimum=1)
    ladder: str = setting("early", choices=LADDERS, option=False)
    keep: float = setting(0.6, "Share of a rung's proposals that train on to the next (by the selection rule).",
                          minimum=0, maximum=1, exclusive=True, metavar="FRACTION")
    holdout: Optional[float | int] = setting(None)
    short_lr: float = setting(0.005, "Fine-tune learning rate (constant).")
    seed_epochs: int = setting(15, "Epochs to train the seed when no --weights.", minimum=1)
    long_epochs: int = setting(5, "Final fine-tune epochs.", minimum=0)
    # fine-tune the adapted weights, retrain the adapted shape from scratch, or auto (final_method)
    final: str = setting(
        "auto", "fine-tune: the adapted weights for --long-epochs at lr/10; retrain: the adapted shape from a "
        "fresh initialisation for --seed-epochs + --long-epochs at --lr (MobileNetV3 retrained after NetAdapt; "
        "drops pretrained --weights); auto: retrain, or fine-tune when --weights are given.", choices=FINALS)
    lr: float = setting(0.1, "Seed training learning rate.")
    batch_size: int = setting(64)
    train_resolution: int = setting(32)
    resolution: Optional[int] = setting(None)  # deployment resolution override
    num_classes: Optional[int] = None  # default: the dataset's; no option (a run takes the dataset's)
    limit: Optional[int] = setting(None)
    step: int = setting(8, "Channel step of the proposals' widths.", minimum=1)
    seed: int = setting(0)
    backend: str = setting("onnxruntime")
    # what the latency table, the confirmation beside the seed and the reported test accuracy compute in: fp32,
    # or int8 (post-training static quantization; the final network is scored as the quantized file)
    precision: str = setting(
        "fp32", " The run's table, its knapsack or loop and its confirmation beside the seed time this "
        "precision; int8 quantizes the final network on 512 training images (final_int8.onnx) and reports that "
        "file's test accuracy.", choices=PRECISIONS)
    threads: int = setting(1)
    lut: Optional[str] = setting(None)
    max_iterations: int = setting(200, "Stop with an error when the budget is not met after this many iterations.",
                                  minimum=1)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.precision != "fp32" and self.backend in FP32_BACKENDS:  # refused before a folder is written
            raise UserError(f"backend {self.backend} times FP32 only, not {self.precision.upper()}; use --backend "
                            f"onnxruntime, executorch or openvino for INT8")
        for name in ("short_steps", "rungs", "batch_size", "step", "max_iterations", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.keep < 1:
            raise UserError(f"--keep {self.keep}: give the fraction of proposals that go on to the next rung, "
                            f"between 0 and 1 (0.6)")
        fewest = self.rung_divisor()
        if self.short_steps < fewest:
            raise UserError(f"--short-steps {self.short_steps} is too few for --rungs {self.rungs}: the first rung "
                            f"scores after short-steps/{fewest}, so use at least {fewest} steps or fewer rungs")
        if self.holdout is not None and not (0 < self.holdout < 1 if isinstance(self.holdout, float)
                                             else self.holdout >= 1):
            raise UserError(f"--holdout {self.holdout}: give a fraction between 0 and 1 (0.1) or a number of images "
                            f"(1000)")

    def final_method(self) -> str:
        """How the adapted network is finished: `auto` retrains the shape when this run trained the seed itself
        (on Fashion-MNIST the retrained shapes beat the fine-tuned weights by 1.5-2.2 points at the same
        training steps, benchmarks/netadapt.py) and fine-tunes when the user gave --weights (pretrained
        weights carry more than this run could train again)."""
        if self.final != "auto":
            return self.final
        return "fine-tune" if self.weights else "retrain"

    @property
    def iterative(self) -> bool:
        """Whether the run iterates in an Optuna study (netadapt, hybrid), which workers can join."""
        return self.method in ITERATIVE_METHODS

    def importance_name(self) -> str:
        """The importance estimator this run uses (`auto` resolved by the method)."""
        return METHOD_IMPORTANCE[self.method] if self.importance == "auto" else self.importance

    def rung_divisor(self) -> int:
        """short_steps / this is the first rung's step count (1 with a single rung)."""
        if self.rungs == 1:
            return 1
        return 2 ** self.rungs if self.ladder == "early" else 2 ** (self.rungs - 1)

    def rung_steps(self) -> list[int]:
        """Cumulative fine-tune steps at which proposals are scored, one entry per rung.

        `early` (default): short_steps/2^rungs, ..., short_steps/4, then short_steps (3 rungs: /8, /4, /1).
        `geometric` (runs made before the ladder existed): short_steps/2^(rungs-1), ..., /2, /1. Why early:
        replayed on 32 iterations of full evaluation (benchmarks/pruner.py, Fashion-MNIST), a proposal's rank
        after short_steps/8 or /4 predicted the final choice about as well as after /2, so a rung at /2 buys
        little; spending its steps on keeping 60 % instead of half picked full evaluation's choice in 28 of
        32 iterations (geometric, half: 23) at 53 % of the steps saved (51 %).
        """
        steps = [self.short_steps * 2 ** i // self.rung_divisor() for i in range(self.rungs)]
        steps[-1] = self.short_steps  # the last rung is the whole fine-tune (on the early ladder, not /2)
        return steps

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if {"pruner", "reports"} & set(data):
            raise UserError(f"{where}: this run was made by an older mnv3-search (Optuna pruner, --reports); it cannot "
                            f"be resumed by this version: start a new run (another --out)")
        if unknown:
            raise UserError(f"{where}: unknown run setting {unknown[0]!r}; was it written by a newer mnv3-search?")
        data = {**LEGACY_SETTINGS, **data} if "ladder" not in data else data
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise UserError(f"{where}: run setting {missing[0]!r} is missing; the file is damaged: restore it from a "
                            f"copy, or start the run again in another folder (--out)")
        return cls(**data)

    def differences(self, other: "RunConfig") -> list[str]:
        """Settings that differ, except those a resumed run may change (`RESUMABLE`)."""
        mine, theirs = self.as_json(), other.as_json()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k] and k not in RESUMABLE]
