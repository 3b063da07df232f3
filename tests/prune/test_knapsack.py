"""--method knapsack (prune/knapsack.py, HALP-style): the multiple-choice knapsack is exact, the Taylor
importance scores what the loss depends on, the shapes meet their budget and keep the channels they valued,
and the loop times the shape beside the seed until the measurement meets a latency budget."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mnv3_search import build_model, load_spec, proposal_groups
from mnv3_search.cli import cli
from mnv3_search.data import load_dataset
from mnv3_search.model.counts import spec_macs
from mnv3_search.netadapt import RunConfig, run_netadapt
from mnv3_search.netadapt.knapsack_search import bisect_goal, next_goal, push_goal
from mnv3_search.prune.importance import GroupScores, Taylor
from mnv3_search.prune.knapsack import knapsack_shape, shrink_to, solve_multiple_choice, widths_of
from mnv3_search.model.weights import read_checkpoint
from mnv3_search.prune.surgery import child_spec, shrink
from mnv3_search.spec.arch import ArchSpec
from support.tiny_run import MICRO_ARGS, MICRO_SPEC_PATH

TINY = dict(data="digits", limit=240, batch_size=32, short_steps=8, seed_epochs=2, long_epochs=1,
            resolution=64, threads=1)


def brute_force(costs: list[np.ndarray], values: list[np.ndarray], capacity: float) -> float:
    best = -np.inf
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[p] for c, p in zip(costs, picks)) <= capacity:
            best = max(best, sum(v[p] for v, p in zip(values, picks)))
    return float(best)


@pytest.mark.parametrize("instance", range(12))
def test_the_knapsack_finds_the_best_choice_per_group(instance: int) -> None:
    rng = np.random.default_rng(instance)
    groups = int(rng.integers(2, 5))
    # integer costs, so the discretisation (capacity / bins units) is exact and the optimum is the brute force's
    costs = [rng.integers(0, 10, size=int(rng.integers(2, 5))).astype(float) for _ in range(groups)]
    values = [rng.uniform(0, 5, size=len(c)) for c in costs]
    capacity = float(rng.integers(int(sum(c.min() for c in costs)), int(sum(c.max() for c in costs)) + 1))
    picks = solve_multiple_choice(costs, values, capacity, bins=int(capacity) if capacity > 0 else 1)
    assert sum(c[p] for c, p in zip(costs, picks)) <= capacity
    assert sum(v[p] for v, p in zip(values, picks)) == pytest.approx(brute_force(costs, values, capacity))


def test_the_knapsack_refuses_a_capacity_nothing_fits() -> None:
    with pytest.raises(ValueError, match="no choice fits a capacity of 2"):
        solve_multiple_choice([np.array([3.0, 5.0]), np.array([1.0])], [np.array([1.0, 2.0]), np.array([1.0])], 2.0)


@pytest.fixture(scope="module")
def micro_seed(micro_run: Path) -> tuple:
    spec, state = read_checkpoint(micro_run / "seed.pt")
    data = load_dataset("digits", resolution=32, holdout=0.1, limit=240, seed=0)
    return spec, state, data


def test_a_channel_the_loss_cannot_see_scores_zero_and_is_cut_first(micro_seed: tuple) -> None:
    """Taylor importance is (weight x gradient)^2 over a channel's BatchNorm scales and shifts: a channel whose
    BN scales and shifts are zero (expansion and depthwise) feeds nothing forward and scores exactly 0; every
    other channel scores above 0; a cut keeps the highest scores, so those channels go first."""
    spec, state, data = micro_seed
    groups = proposal_groups(spec, 8)
    exp2 = next(g for g in groups if g.name == "exp2")
    silenced = dict(state)
    dead = [3, 17, 40, 41, 60, 77, 90, 95]
    for bn in ("features.2.block.0.1", "features.2.block.1.1"):  # block 2's expansion and depthwise BN
        for tensor in (f"{bn}.weight", f"{bn}.bias"):
            silenced[tensor] = state[tensor].clone()
            silenced[tensor][dead] = 0.0
    scores = Taylor(data, num_batches=4)(spec, silenced, groups)
    importance = next(s for s in scores if s.group.name == "exp2").importance
    assert importance[dead].tolist() == [0.0] * len(dead)
    assert (np.delete(importance, dead) > 0).all()
    shape = child_spec(spec, "exp2", exp2.channels - len(dead))
    kept = shrink_to(spec, silenced, scores, shape)
    survivors = [i for i in range(exp2.channels) if i not in dead]
    assert torch.equal(kept["features.2.block.0.0.weight"], silenced["features.2.block.0.0.weight"][survivors])
    # by L2 norm (NetAdapt's rule, no scores) the cut would keep other channels: the scores decided
    by_norm = shrink(spec, silenced, "exp2", exp2.channels - len(dead))[1]
    assert not torch.equal(by_norm["features.2.block.0.0.weight"], kept["features.2.block.0.0.weight"])


def test_a_knapsack_shape_meets_its_macs_target_and_loads_its_weights(micro_seed: tuple) -> None:
    spec, state, data = micro_seed
    groups = proposal_groups(spec, 8)
    scores = Taylor(data, num_batches=4)(spec, state, groups)
    seed_macs = spec_macs(spec)
    for share in (0.8, 0.6, 0.45):
        shape, price = knapsack_shape(spec, scores, lambda s: float(spec_macs(s)), share * seed_macs)
        assert price == spec_macs(shape) <= share * seed_macs
        assert price >= (share - 0.03) * seed_macs  # close to the target: the capacity was moved up to it
        model = build_model(shape)
        model.load_state_dict(shrink_to(spec, state, scores, shape), strict=True)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="no shape meets"):
        knapsack_shape(spec, scores, lambda s: float(spec_macs(s)), 0.01 * seed_macs)


def test_the_group_whose_channels_matter_keeps_its_width() -> None:
    """The same budget, importance concentrated in one group or in another: that group keeps every channel
    and the other is cut, so the scores, not the order of the groups, decide. Priced by channel count (every
    channel costs the same), so only the scores differ."""
    spec = load_spec(MICRO_SPEC_PATH)
    groups = proposal_groups(spec, 8)

    def channels(s: ArchSpec) -> float:
        return float(sum(widths_of(s, groups)))

    widths = {}
    for rich, poor in (("last_conv", "hidden"), ("hidden", "last_conv")):  # every other group in between
        value = {rich: 10.0, poor: 0.001}
        scores = [GroupScores(g, np.full(g.channels, value.get(g.name, 1.0))) for g in groups]
        shape, price = knapsack_shape(spec, scores, channels, 0.85 * channels(spec))
        assert 0.85 * channels(spec) - 8 < price <= 0.85 * channels(spec)
        widths[rich] = dict(zip([g.name for g in groups], widths_of(shape, groups)))
    # 656 channels, target 557.6: 13 steps of 8 come off, all from the group that matters least
    full = {"out0": 32, "exp1": 64, "out1": 32, "exp2": 96, "out2": 48, "last_conv": 128, "hidden": 256}
    assert widths["last_conv"] == {**full, "hidden": 256 - 104}
    assert widths["hidden"] == {**full, "last_conv": 128 - 104}


def test_knapsack_run_meets_a_macs_budget_from_the_cli(micro_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "knapsack"
    result = CliRunner().invoke(cli, ["netadapt", str(MICRO_SPEC_PATH), "--budget", "0.7M-macs", "--method",
                                      "knapsack", "--out", str(out), *MICRO_ARGS])
    assert result.exit_code == 0, result.output
    assert "budget met after 1 knapsack rounds" in result.output
    final = load_spec(out / "final.yaml")
    assert spec_macs(final) <= 700_000
    rows = pd.read_csv(out / "iterations.csv")
    assert rows["proposal"].tolist() == ["seed", "knapsack"]
    assert rows["macs"].iloc[-1] == spec_macs(final)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "knapsack" and run["result"]["final_method"] == "retrain"
    assert not (out / "study.journal").exists() and not (out / "artifacts").exists()  # no proposals, no study
    assert (run["storage"], run["study"], run["artifacts"]) == (None, None, None)
    # the report reads a run without proposals
    shown = CliRunner().invoke(cli, ["report", str(out)])
    assert shown.exit_code == 0, shown.output
    assert all((out / name).exists() for name in ("iterations.png", "proposals.png", "widths.png"))
    # the seed is the micro run's (same settings, same seed): the knapsack started from the same weights
    _, mine = read_checkpoint(out / "seed.pt")
    _, theirs = read_checkpoint(micro_run / "seed.pt")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("extra, named", [
    (["--workers", "2"], "--workers 2"), (["--storage", "sqlite:///x.db"], "--storage"),
    (["--workers", "2", "--artifacts", "store"], "--workers 2 and --artifacts")])
def test_knapsack_refuses_study_options(tmp_path: Path, extra: list[str], named: str) -> None:
    result = CliRunner().invoke(cli, ["netadapt", str(MICRO_SPEC_PATH), "--budget", "0.7M-macs", "--method",
                                      "knapsack", *extra, "--out", str(tmp_path / "w"), *MICRO_ARGS])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("spec:")]
    assert lines == ["Error: --method knapsack scores every channel once in this process and keeps no Optuna "
                     f"study: {named} has nothing to do; leave it out"]
    assert not (tmp_path / "w").exists()


@pytest.mark.timing
def test_knapsack_latency_budget_is_met_by_measurement(tiny_seed: Path, tmp_path: Path) -> None:
    """Every round's shape is timed beside the seed; the chosen one's measured share meets the budget and is
    the measured one closest to it; the rounds' targets move by the measurement (table -> measured ratio)."""
    out = tmp_path / "latency"
    result = run_netadapt(RunConfig(spec_path="small", budget="70%", method="knapsack",
                                    weights=str(tiny_seed),  # the tiny run's seed alone
                                    **{**TINY, "long_epochs": 0}), out=str(out))
    assert result.measured_latency_ms is not None and result.seed_measured_latency_ms is not None
    share = result.measured_latency_ms / result.seed_measured_latency_ms
    assert share <= 0.70
    rows = pd.read_csv(out / "iterations.csv")
    rounds = rows[rows["iteration"] > 0]
    assert set(rounds["proposal"]) == {"knapsack"} and len(rounds) >= 1
    assert rounds["measured_latency_ms"].notna().all() and rounds["seed_measured_latency_ms"].notna().all()
    shares = rounds["measured_latency_ms"] / rounds["seed_measured_latency_ms"]
    assert share == pytest.approx(shares[shares <= 0.70].max())
    final = load_spec(out / "final.yaml")
    chosen = rounds.loc[(shares - share).abs().idxmin()]
    assert chosen["macs"] == spec_macs(final)
    first_target = rounds["target_latency_ms"].iloc[0]
    assert first_target == pytest.approx(0.70 * rows["predicted_latency_ms"].iloc[0])
    seed_predicted = rows["predicted_latency_ms"].iloc[0]
    if len(rounds) > 1:  # round 2's goal: round 1's scaled by the budget over what round 1 measured
        first = rounds.iloc[0]
        reached = first["measured_latency_ms"] / first["seed_measured_latency_ms"] * seed_predicted
        assert rounds["target_latency_ms"].iloc[1] == pytest.approx(first_target * first_target / reached)


def test_the_next_goal_interpolates_between_the_rounds_either_side_of_the_budget() -> None:
    # one round over the target: scale by target / measured
    assert next_goal([(1.6, 2.0)], 1.5) == pytest.approx(1.2)
    # one under, one over: the straight line through the closest of each reaches the target
    assert next_goal([(1.5, 1.26), (1.8, 1.75)], 1.5) == pytest.approx(1.5 + 0.24 * 0.3 / 0.49)
    # a farther round on either side is ignored
    assert next_goal([(1.0, 0.9), (1.5, 1.26), (2.2, 2.4), (1.8, 1.75)], 1.5) == pytest.approx(1.5 + 0.24 * 0.3 / 0.49)
    # a goal whose shape was timed already: halfway between the bracket's goals, none without a bracket
    assert bisect_goal([(1.0, 0.9), (1.5, 1.26), (2.2, 2.4), (1.8, 1.75)], 1.5) == pytest.approx(1.65)
    assert bisect_goal([(1.5, 1.26), (1.0, 0.9)], 1.5) is None
    # a goal that gave a shape timed already, every round on one side: pushed on by at least KNAPSACK_SLACK
    assert push_goal(1.0, 0.71, 0.70) == pytest.approx(0.97)  # scaling alone (x0.986) gave the same shape
    assert push_goal(1.0, 0.80, 0.70) == pytest.approx(0.875)  # a larger miss scales as next_goal would
    assert push_goal(1.0, 0.69, 0.70) == pytest.approx(1.03)
    assert push_goal(1.0, 0.50, 0.70) == pytest.approx(1.4)
