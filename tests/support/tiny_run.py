"""Tiny real NetAdapt runs the tests share: Small at 64 px and a two-block micro network, both on digits with
MACs budgets. tests/conftest.py makes each once per session (fixtures `tiny_run`, `tiny_seed`, `micro_run`);
the builders here take the folder to write, so they own no temporary state of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# Two blocks at 32 px (tests/data/micro.yaml): 1,335,808 MACs, 7 proposal groups; a proposal's rung trains and
# scores in a third of a second, where Small's takes a second, so runs that only need *a* deterministic run use
# this one.
MICRO_SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "micro.yaml"
MICRO_BUDGET = "1.15M-macs"  # 4 iterations of 6-7 proposals (1,335,808 -> 1,111,040 MACs)
# the micro run's settings as command-line options (its own resolution, 32 px); 10 seed epochs (~4 s) lift the
# seed from chance (11 % after 2) to a third, so proposals' holdout scores differ and comparisons have teeth
MICRO_ARGS = ["--limit", "240", "--batch-size", "32", "--short-steps", "8", "--seed-epochs", "10",
              "--long-epochs", "1", "--threads", "1", "--quiet"]


def build_tiny_run(out: Path, on_event: Callable[..., None]) -> Path:
    """~15-40 s on 2 shared cores: 1-2 iterations, 8-step fine-tunes, 2 seed epochs on 240 images. Every
    event the run emits goes to `on_event(kind, **info)` (tests/netadapt/test_events.py checks them)."""
    from mnv3_search.netadapt import RunConfig, run_netadapt

    config = RunConfig(spec_path="small", budget="5.3M-macs", data="digits", resolution=64, limit=240,
                       batch_size=32, short_steps=8, seed_epochs=2, long_epochs=1, threads=1)
    run_netadapt(config, out=str(out), on_event=on_event)
    return out


def build_tiny_seed(path: Path) -> Path:
    """The tiny run's seed alone (Small at 64 px, 2 epochs on the same 240 digits, the loop's own seed
    training), in ~3 s: for the `timing` tests, which run in a process of their own and need a trained seed
    to adapt, not the ~30 s run around it."""
    import torch

    from mnv3_search import build_model, load_spec
    from mnv3_search.model.weights import save_state
    from mnv3_search.netadapt import RunConfig
    from mnv3_search.netadapt.evaluate import load_run_dataset
    from mnv3_search.spec.spaces import resolve_spec_path
    from mnv3_search.train import to_memory_format, train_epochs

    config = RunConfig(spec_path="small", budget="5.3M-macs", data="digits", resolution=64, limit=240,
                       batch_size=32, seed_epochs=2, threads=1)
    dataset = load_run_dataset(config)
    spec = load_spec(resolve_spec_path("small")).with_overrides(resolution=64,
                                                                num_classes=dataset.num_classes).scaled()
    torch.manual_seed(config.seed)
    model = to_memory_format(build_model(spec), torch.channels_last)  # as the loop trains its seed
    train_epochs(model, dataset, config.seed_epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    save_state({k: v.contiguous() for k, v in model.state_dict().items()}, spec, path)
    return path


def build_micro_run(out: Path) -> Path:
    """The micro network adapted to MICRO_BUDGET in one process (MICRO_ARGS' settings, default halving):
    the reference that multi-process and resumed runs of the same settings must reproduce. ~10-25 s."""
    from mnv3_search.netadapt import RunConfig, run_netadapt

    config = RunConfig(spec_path=str(MICRO_SPEC_PATH), budget=MICRO_BUDGET, data="digits", limit=240,
                       batch_size=32, short_steps=8, seed_epochs=10, long_epochs=1, threads=1)
    run_netadapt(config, out=str(out))
    return out

