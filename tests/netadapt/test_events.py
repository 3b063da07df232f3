"""A run's events are one closed set (netadapt/events.py), the loop emits only those, and the CLI's live view
says something for every one of them: no kind is silently dropped. Also the library's worker (worker.py):
joining a run, its refusals, and the local worker process leaving when its netadapt is gone.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

import mnv3_search.netadapt as netadapt_package
from mnv3_search.cli import cli
from mnv3_search.cli.netadapt import NetAdaptView
from mnv3_search.errors import UserError
from mnv3_search.netadapt import RunConfig, run_netadapt
from mnv3_search.netadapt.attrs import CONFIG_ATTR, GROUPS_ATTR, RUN_DIR_ATTR
from mnv3_search.netadapt.events import EVENT_KINDS
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.netadapt.study import STORAGE_ENV, create_study, load_study, set_status
from mnv3_search.netadapt.worker import WORKER_MODULE, join_run

REPO = Path(__file__).resolve().parents[2]

# one realistic info per kind (the keywords the loop passes, checked below) and the live view's "now" line for it
SAMPLES: dict[str, tuple[dict[str, Any], str]] = {
    "resume": ({"run_dir": "results/r"}, "resuming the run in results/r"),
    "already_finished": ({"run_dir": "results/r"}, "results/r holds a finished run: nothing to train"),
    "nothing_to_do": ({"seed": 5.5e6, "target": 6e6}, "nothing to do: the seed already meets the budget"),
    "transfer": ({"note": "w.pt: made for 1000 classes"},
                 "seed weights from --weights, final layer replaced (another class count)"),
    "seed_training": ({"epochs": 2}, "training the seed (2 epochs)"),
    "seed_step": ({"step": 7, "loss": 1.23456}, "training the seed: step 7, loss 1.235"),
    "calibrating": ({}, "measuring the seed and calibrating the latency table"),
    "seed": ({"value": 2.5, "target": 2.0, "unit": "ms"}, "seed at 2.500 ms"),
    "iteration": ({"iteration": 3, "current": 2.4, "goal": 2.3, "target": 2.0, "proposals": 11},
                  "fine-tuning proposals"),
    "progress": ({"iteration": 3, "rung": 1, "rungs": 2, "done": 2, "running": 6, "pruned": 5, "total": 11},
                 "fine-tuning proposals"),
    "retry": ({"iteration": 3}, "a worker went silent: its proposal was enqueued again"),
    "recovered": ({"note": "RUN/trials/00003.state.pt: truncated or damaged training state; re-training ..."},
                  "a trial's files were unreadable: its proposal is trained again from its parent"),
    "chosen": ({"iteration": 3, "proposal": "exp2=48", "holdout_accuracy": 0.875, "resource": 2.3,
                "wall_seconds": 12.0}, "choosing"),
    "unreliable": ({"attempt": 1, "ratio_shift": 0.123, "spread": 0.2},
                   "timing disturbed by the host (ratio moved 12.3 %): measuring again (1)"),
    "confirm": ({"measured": 1.9, "seed_measured": 2.5, "ok": True, "reliable": False},
                "measured 1.900 ms (seed 2.500 ms, host disturbed: marked unreliable): budget met"),
    "disagreement": ({"measured_latency_ms": 2.1, "seed_measured_latency_ms": 2.5, "latency_reliable": True,
                      "corrected_target": 1.8},
                     "the measurement disagreed with the table: target corrected to 1.800 ms, going on"),
    "importance": ({"groups": 18, "channels": 2968, "name": "taylor", "batches": 32},
                   "scoring 2,968 channels in 18 groups (Taylor, 32 batches)"),
    "knapsack": ({"round": 2, "goal": 1.8, "predicted": 1.75, "ok": False},
                 "knapsack round 2: shape at 1.750 ms, timed beside the seed: over the budget"),
    "long_finetune": ({"epochs": 3, "method": "retrain"}, "retraining the adapted shape from scratch (3 epochs)"),
    "long_step": ({"step": 4, "loss": 0.5}, "long fine-tune: step 4, loss 0.500"),
    "finished": ({"test_accuracy": 0.8125}, "done: test accuracy 81.2%"),
}


def now_line(view: NetAdaptView) -> str:
    """The panel's "now" row as a terminal shows it."""
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(view.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return next(line for line in text.splitlines() if line.startswith("now")).removeprefix("now").strip()


def new_view() -> NetAdaptView:
    return NetAdaptView(Console(file=io.StringIO(), width=200), "80%")


def emit_calls() -> list[tuple[str, set[str], Path, int]]:
    """Every `emit("kind", key=...)` call in the library's netadapt package: kind, keyword names, where."""
    found = []
    for path in sorted(Path(netadapt_package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "emit":
                first = node.args[0]
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                    f"{path.name}:{node.lineno}: an event kind must be a literal"
                found.append((first.value, {k.arg for k in node.keywords if k.arg}, path, node.lineno))
    return found


def test_every_kind_renders_its_own_line_in_the_live_view() -> None:
    assert set(SAMPLES) == set(EVENT_KINDS)  # a new kind needs a sample here, and a line in the view
    view = new_view()
    for kind in EVENT_KINDS:
        info, line = SAMPLES[kind]
        view(kind, **info)
        assert now_line(view) == line, kind


def test_the_loop_emits_exactly_the_declared_kinds_with_the_sampled_details() -> None:
    calls = emit_calls()
    assert {kind for kind, *_ in calls} == set(EVENT_KINDS)  # nothing undeclared, nothing declared for nothing
    for kind, keywords, path, line in calls:
        assert keywords <= set(SAMPLES[kind][0]), f"{path.name}:{line}: {kind} passes {keywords}"


def test_a_recorded_run_emits_declared_kinds_and_the_view_renders_them_all(
        tiny_run: Path, tiny_run_events: list[tuple[str, dict[str, Any]]], tmp_path: Path) -> None:
    folder = tiny_run  # making it recorded its events in tiny_run_events
    kinds = [kind for kind, _ in tiny_run_events]
    assert set(kinds) <= set(EVENT_KINDS)
    # a MACs budget from an untrained seed: no timing, no resume, every other step of a run once or more
    assert set(kinds) == {"seed", "seed_training", "seed_step", "iteration", "progress", "chosen", "long_finetune",
                          "long_step", "finished"}
    assert kinds[:2] == ["seed", "seed_training"] and kinds[-1] == "finished"
    view = new_view()
    for kind, info in tiny_run_events:
        view(kind, **info)  # type: ignore[arg-type]
    accuracy = RunFolder(folder).read_run_json()["result"]["test_accuracy"]
    assert now_line(view) == f"done: test accuracy {100 * accuracy:.1f}%"
    # the same run again: it continues in its folder, finds it finished and trains nothing
    again: list[tuple[str, dict[str, Any]]] = []
    config = RunConfig.from_json(RunFolder(folder).read_run_json()["config"], "run.json")
    run_netadapt(config, out=str(folder), on_event=lambda kind, **info: again.append((kind, info)))
    assert again == [("resume", {"run_dir": str(folder)}), ("already_finished", {"run_dir": str(folder)})]


def test_the_live_view_of_a_finished_run_says_so(tiny_run: Path) -> None:
    """Without --quiet or --json the CLI renders its live view (on stderr); its last "now" line is kept."""
    folder = tiny_run
    result = CliRunner().invoke(cli, ["netadapt", "--resume", str(folder)])
    assert result.exit_code == 0, result.output
    panel = " ".join(result.stderr.split())  # the panel wraps at the terminal's width
    assert f"now {folder} holds a finished run: nothing to train" in panel, result.stderr
    assert f"already finished: {folder} holds a finished run" in result.stdout


# --- the worker in the library --------------------------------------------------------------------------------

def test_join_run_of_a_finished_run_evaluates_nothing_and_says_so(tiny_run: Path) -> None:
    folder = tiny_run
    lines: list[str] = []
    storage, name = RunFolder(folder).default_storage_url, folder.resolve().name
    assert join_run(storage, name, log=lines.append) == 0
    assert lines == [f"worker joined study {name!r}; run folder {folder.resolve()}",
                     "worker done: 0 proposals evaluated"]
    with pytest.raises(UserError, match=r"/elsewhere: no seed.pt here; pass --run-dir with the run folder as "
                                        r"mounted on this machine$"):
        join_run(storage, name, "/elsewhere")


def test_join_run_refuses_a_study_no_netadapt_started(tmp_path: Path) -> None:
    storage = str(tmp_path / "s.journal")
    create_study(storage, "empty")
    with pytest.raises(UserError, match=r"^study 'empty' has not started a NetAdapt run; start `mnv3-search "
                                        r"netadapt` first$"):
        join_run(storage, "empty", wait_seconds=0)


def test_a_local_worker_leaves_when_its_netadapt_is_gone(tiny_run: Path, tmp_path: Path) -> None:
    """A real worker process (the module --workers starts, the URL in its environment only) joins a running
    study and exits as soon as its parent pid is gone, though the run is not finished."""
    folder = tiny_run
    finished = load_study(RunFolder(folder).default_storage_url, folder.resolve().name)
    storage = str(tmp_path / "running.journal")
    study = create_study(storage, "running")
    for attr in (CONFIG_ATTR, RUN_DIR_ATTR, GROUPS_ATTR):
        study.set_user_attr(attr, finished.user_attrs[attr])
    set_status(study, "running")
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = {**os.environ, STORAGE_ENV: storage, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--study", "running", "--parent-pid", str(gone.pid)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"worker joined study 'running'; run folder {folder.resolve()}",
                                        "worker done: 0 proposals evaluated"]  # no runpy warning either
    del env[STORAGE_ENV]
    refused = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--study", "running"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"Error: no storage: set ${STORAGE_ENV} to the run's storage URL"


@pytest.mark.slow
def test_no_library_module_imports_click_or_rich() -> None:
    """The library (worker.py included) is usable without the CLI's packages: click and rich are cli/'s alone."""
    package = REPO / "mnv3_search"
    modules = sorted(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for path in package.rglob("*.py") if "cli" not in path.relative_to(package).parts
                     and path.name != "__main__.py")
    assert "mnv3_search.netadapt.worker" in modules and "mnv3_search.netadapt.events" in modules
    code = (f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'click', 'rich'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
