"""Optuna's private API is reached from one module (netadapt/study.py), and that module's mirror of it still
matches the Optuna this project pins: an Optuna upgrade that renames or changes it fails here, not in a run."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from mnv3_search.netadapt.study import _pop_waiting_trial_id, storage_of, study_storage_id, trial_storage_id

PACKAGE = Path(__file__).resolve().parents[2] / "mnv3_search"
PRIVATE_ATTRS = {"_storage", "_study_id", "_trial_id", "_pop_waiting_trial_id"}


def _private_optuna_uses(path: Path) -> list[str]:
    """Private Optuna names `path` reaches: attributes above, and optuna modules or names starting with `_`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            if any(part.startswith("_") for part in parts):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("optuna.") \
                and any(part.startswith("_") for part in node.value.split(".")):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_optuna_private_names_are_reached_from_one_module() -> None:
    uses = {str(p.relative_to(PACKAGE)): found for p in sorted(PACKAGE.rglob("*.py"))
            if (found := _private_optuna_uses(p))}
    assert sorted(uses) == ["netadapt/study.py"], uses
    # the scan itself can see them: study.py's three accessors, the mirror's own name and the logger's module
    assert len(uses["netadapt/study.py"]) >= 4


def test_the_pinned_optuna_is_the_one_study_py_mirrors() -> None:
    major = int(optuna.__version__.split(".")[0])
    assert major == 5, (f"netadapt/study.py mirrors Optuna 5's private Study._pop_waiting_trial_id and reads "
                        f"Study._storage/_study_id and Trial._trial_id; check them against Optuna "
                        f"{optuna.__version__}, then widen pyproject.toml's pin and this test")


def test_the_accessors_return_what_optuna_itself_uses() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert storage_of(study) is storage
    assert storage.get_study_id_from_name(study.study_name) == study_storage_id(study)
    assert storage.get_trial_id_from_study_id_trial_number(study_storage_id(study), trial.number) == \
        trial_storage_id(trial)
    assert trial_storage_id(study.trials[0]) == trial_storage_id(trial)


@pytest.mark.parametrize("finished_elsewhere", [None, 0, 1])
def test_the_claim_mirror_pops_what_optunas_own_pops(finished_elsewhere: int | None) -> None:
    """Both move the oldest WAITING trial to RUNNING and skip one another process already finished."""
    popped = []
    for pop in (_pop_waiting_trial_id, lambda s: s._pop_waiting_trial_id()):  # noqa: SLF001 - the original
        study = optuna.create_study()
        for x in range(3):
            study.enqueue_trial({"x": x})
        if finished_elsewhere is not None:
            frozen = study.get_trials(deepcopy=False)[finished_elsewhere]
            storage_of(study).set_trial_state_values(trial_storage_id(frozen), optuna.trial.TrialState.FAIL)
        order = []
        while (trial_id := pop(study)) is not None:
            order.append(storage_of(study).get_trial(trial_id).number)
        popped.append(order)
    assert popped[0] == popped[1]
    assert popped[0] == [n for n in range(3) if n != finished_elsewhere]
