"""`--final retrain` (the default, `auto`, when the run trained its seed): the adapted shape trained again from a
fresh initialisation (MobileNetV3 retrained its network after NetAdapt), instead of fine-tuning the adapted
weights (`--final fine-tune`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mnv3_search import UserError, load_spec
from mnv3_search.netadapt import RunConfig, run_netadapt
from mnv3_search.netadapt.runfolder import RunFolder
from support.tiny_run import MICRO_BUDGET, MICRO_SPEC_PATH

TINY = dict(spec_path="small", budget="5.3M-macs", data="digits", resolution=64, limit=240, batch_size=32,
            short_steps=8, seed_epochs=2, long_epochs=1, threads=1)


def _stem_similarity(run: Path) -> float:
    """Cosine similarity of the stem conv in final.pt and in the last iteration's chosen network."""
    rows = RunFolder(run).read_iterations()
    _, chosen = RunFolder.load(RunFolder(run).iteration_checkpoint(rows[-1].iteration))
    _, final = RunFolder.load(run / "final.pt")
    a, b = chosen["features.0.0.weight"].flatten(), final["features.0.0.weight"].flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_retrain_trains_the_adapted_shape_from_scratch(micro_run: Path, tmp_path: Path) -> None:
    retrained = micro_run  # the session's micro run (4 iterations): it trained its seed, so auto retrains
    out = tmp_path / "fine-tune"
    micro = dict(spec_path=str(MICRO_SPEC_PATH), budget=MICRO_BUDGET, data="digits", limit=240, batch_size=32,
                 short_steps=8, seed_epochs=10, long_epochs=1, threads=1)
    assert RunFolder(retrained).read_run_json()["config"] == RunConfig(**micro).as_json()  # the same run but its end
    result = run_netadapt(RunConfig(**micro, final="fine-tune"), out=str(out))
    # the same adaptation path (the final stage comes after it), the same final shape
    assert load_spec(out / "final.yaml") == load_spec(retrained / "final.yaml")
    assert [r.proposal for r in RunFolder(out).read_iterations()] == \
        [r.proposal for r in RunFolder(retrained).read_iterations()]
    # fine-tuning keeps the adapted weights; retraining starts from a fresh initialisation
    assert _stem_similarity(out) > 0.9
    assert abs(_stem_similarity(retrained)) < 0.5
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["final"] == "fine-tune" and saved["result"]["final_method"] == "fine-tune"
    auto = json.loads((retrained / "run.json").read_text())
    assert auto["config"]["final"] == "auto" and auto["result"]["final_method"] == "retrain"
    assert result.test_accuracy is not None and 0.0 <= result.test_accuracy <= 1.0


def test_unknown_final_is_one_line() -> None:
    with pytest.raises(UserError, match=r"^--final 'scratch': use one of auto, fine-tune, retrain$"):
        RunConfig(**{**TINY, "final": "scratch"})


def test_auto_final_retrains_a_seed_it_trained_and_fine_tunes_given_weights() -> None:
    assert RunConfig(**TINY).final == "auto"
    assert RunConfig(**TINY).final_method() == "retrain"
    assert RunConfig(**TINY, weights="seed.pt").final_method() == "fine-tune"
    assert RunConfig(**TINY, weights="seed.pt", final="retrain").final_method() == "retrain"
    assert RunConfig(**TINY, final="fine-tune").final_method() == "fine-tune"
