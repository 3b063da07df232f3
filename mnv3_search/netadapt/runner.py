"""A NetAdapt run from start to result: the session, the shape search its method names, the final training.

`run_netadapt(config, **kwargs)` is the library's entry point; `NetAdapt` is the same run as an object, so a
caller (the CLI) can show the spec file and run folder before it starts. Running the same command again
resumes the run in its folder (session.py), or returns the result of a run that finished.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from ..budget import Budget, LATENCY
from ..fileio import atomic_write_bytes, disk_full
from ..latency import export_onnx, torch_threads
from ..model.build import build_model
from ..model.counts import spec_macs, spec_params
from ..prune.importance import make_importance
from ..spec.arch import ArchSpec
from ..spec.yaml_io import dump_spec
from ..train import evaluate, to_memory_format, train_epochs
from .config import RunConfig
from .events import Event, ignore
from .iterative import IterativeSearch, WorkerOptions
from .knapsack_search import KnapsackSearch
from .pricing import BudgetCheck, Pricing, check_budget
from .proposals import KnapsackProposal, ProposalSource
from .runfolder import RunFolder, RunResult
from .session import Found, RunPlan, RunSession, ShapeSearch, finished_result, open_table, start_folder
from .study import as_storage_lost, make_storage


def knapsack_proposal(session: RunSession) -> ProposalSource:
    """`--method hybrid`'s extra proposal source, valuing channels by the run's importance estimator."""
    config = session.config
    importance = make_importance(config.importance_name(), session.dataset, batch_size=config.batch_size,
                                 seed=config.seed)
    return KnapsackProposal(session.pricing, config.step, importance)


def shape_search(method: str, options: WorkerOptions) -> ShapeSearch:
    """The search `--method` names (config.METHODS)."""
    if method == "knapsack":
        return KnapsackSearch()
    return IterativeSearch(options, extra=[knapsack_proposal] if method == "hybrid" else [])


class NetAdapt:
    """One run, planned when made (every check that writes nothing: budget, spec, data, weights, options);
    `run()` does it, resumes it, or returns its result when it finished before."""

    def __init__(self, config: RunConfig, out: Optional[str] = None, storage: Optional[str] = None,
                 workers: int = 1, stale_seconds: float = 300.0, on_event: Optional[Event] = None,
                 command: Optional[list[str]] = None, max_attempts: int = 2,
                 artifacts: Optional[str] = None) -> None:
        self.plan = RunPlan.make(config, out=out, storage=storage, workers=workers, artifacts=artifacts,
                                 command=command)
        self.search = shape_search(config.method, WorkerOptions(workers, stale_seconds, max_attempts))
        self.emit: Event = on_event or ignore

    @property
    def folder(self) -> RunFolder:
        return self.plan.folder

    @property
    def budget(self) -> Budget:
        return self.plan.budget

    def run(self) -> RunResult:
        """Validate everything cheap first (budget, storage), then the run folder, seed, search and finish. A
        database server lost mid-run stops it in one line (StorageLost); the same command resumes it."""
        plan, emit = self.plan, self.emit
        storage = plan.storage_url  # run.json's once a resumed run's folder is opened
        try:
            if storage:
                make_storage(storage)  # an unreachable server is refused before anything is written
            exact = plan.budget.resource != LATENCY
            check: Optional[BudgetCheck] = None
            if exact:  # priced without a table: an unreachable budget or nothing to do writes no folder
                check = check_budget(Pricing(plan.budget), plan.seed_spec, plan.config.step)
                if check.nothing_to_do:
                    return self._nothing_to_do(check)
            started = start_folder(plan, emit)
            storage = started.storage_url
            done = finished_result(plan.folder, emit)
            if done is not None:
                return done
            pricing = Pricing(plan.budget, None if exact else open_table(plan, emit))
            if check is None:
                check = check_budget(pricing, plan.seed_spec, plan.config.step)
                if check.nothing_to_do:
                    return self._nothing_to_do(check)
            session = RunSession.start(plan, started, pricing, check, emit)
            return finish(session, self.search.search(session))
        except Exception as exc:  # an outside resource failed: one line, resumable (docs/reliability.md)
            lost = as_storage_lost(exc, storage) or disk_full(exc)
            if lost is None:
                raise
            raise lost from None

    def _nothing_to_do(self, check: BudgetCheck) -> RunResult:
        self.emit("nothing_to_do", seed=check.seed_value, target=check.target)
        return RunResult(iterations=0, seed_resource=check.seed_value, target=check.target, final_resource=None,
                         measured_latency_ms=None, seed_measured_latency_ms=None, test_accuracy=None,
                         run_dir=self.folder.path, nothing_to_do=True)


def finish(session: RunSession, found: Found) -> RunResult:
    """The final training of what the search found, its files, and the run's result in run.json."""
    config, spec = session.config, found.spec
    final_resource = session.pricing.resource(spec)  # before the training: a table may time what it lacks
    accuracy, fp32_accuracy = final_training(session, spec, found.state)
    result = RunResult(
        iterations=session.log.last.iteration, seed_resource=session.seed_value, target=session.target,
        final_resource=final_resource, measured_latency_ms=found.row.measured_latency_ms,
        seed_measured_latency_ms=found.row.seed_measured_latency_ms, test_accuracy=accuracy,
        final_method=config.final_method(),
        final_macs=spec_macs(spec), final_params=spec_params(spec),
        latency_table_entries_measured=session.pricing.table.measured if session.pricing.table else None,
        precision=config.precision, fp32_test_accuracy=fp32_accuracy if config.precision != "fp32" else None,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"), run_dir=session.folder.path, final_spec=spec)
    session.folder.write_result(result)
    return result


def final_training(session: RunSession, spec: ArchSpec, state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Long fine-tune of the chosen network (or, with `final="retrain"`, its shape trained again from a
    fresh initialisation, as MobileNetV3 did after NetAdapt), the deployable files, and the test accuracy at
    the run's precision beside the FP32 network's. An INT8 run's is the quantized file's own (final_int8.onnx,
    calibrated on training images: `quantize.int8_accuracy`), the network it would deploy."""
    config, dataset, folder, emit = session.config, session.dataset, session.folder, session.emit
    if config.final_method() == "retrain":
        # as many epochs as the adapted weights saw (seed training + long fine-tune), at the seed's lr
        torch.manual_seed(config.seed)
        model = to_memory_format(build_model(spec), torch.channels_last)
        epochs, lr = config.seed_epochs + config.long_epochs, config.lr
    else:
        model = to_memory_format(build_model(spec), torch.channels_last)  # ~1.6x faster training on CPU
        model.load_state_dict(state, strict=True)
        epochs, lr = config.long_epochs, config.lr * 0.1
    emit("long_finetune", epochs=epochs, method=config.final_method())
    if epochs > 0:
        train_epochs(model, dataset, epochs, batch_size=config.batch_size, lr=lr, seed=config.seed,
                     progress=lambda step, loss: emit("long_step", step=step, loss=loss))
    fp32_accuracy = accuracy = evaluate(model, dataset, dataset.test)
    to_memory_format(model, torch.contiguous_format)
    dump_spec(spec, folder.final_yaml)
    RunFolder.save(spec, model.state_dict(), folder.final_pt)
    atomic_write_bytes(folder.final_onnx, export_onnx(model, (1, 3, spec.resolution, spec.resolution)))
    if config.precision == "int8":
        from ..quantize import int8_accuracy

        scores, int8_file = int8_accuracy(model.eval(), dataset, threads=config.threads)
        atomic_write_bytes(folder.final_int8_onnx, int8_file)
        accuracy = scores.file_accuracy
    emit("finished", test_accuracy=accuracy)
    return accuracy, fp32_accuracy


def run_netadapt(config: RunConfig, **kwargs: Any) -> RunResult:
    """Library entry point: `run_netadapt(RunConfig("small", "80%"), out="results/demo")`; keywords as
    `NetAdapt`'s. Training runs on `config.threads` torch threads (default 1: on a small shared machine a
    second thread spin-waits whenever the other core is busy)."""
    with torch_threads(config.threads):
        return NetAdapt(config, **kwargs).run()
