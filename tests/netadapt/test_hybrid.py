"""`--method hybrid`: NetAdapt's iterations with one more proposal each, the knapsack's cut of several groups to
the iteration's goal (netadapt/proposals.py `KnapsackProposal`), evaluated, ranked and recorded with the
one-group proposals; its cuts travel in its trials' user attrs, so a resumed run and the ledger read them back."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from mnv3_search import build_model, load_spec
from mnv3_search.budget import parse_budget
from mnv3_search.cli import cli
from mnv3_search.data import load_dataset
from mnv3_search.model.counts import spec_macs
from mnv3_search.model.weights import read_checkpoint
from mnv3_search.netadapt.attrs import CUTS_ATTR
from mnv3_search.netadapt.pricing import Pricing
from mnv3_search.netadapt.proposals import (HYBRID_OPTIONS, KNAPSACK_PROPOSAL, KnapsackProposal, OneGroupProposals,
                                            Parent, cuts_attrs, trial_cut)
from mnv3_search.netadapt.runfolder import RunFolder
from mnv3_search.netadapt.study import make_storage
from mnv3_search.prune.groups import proposal_groups
from mnv3_search.prune.importance import Taylor
from mnv3_search.prune.knapsack import KnapsackProblem, widths_of
from mnv3_search.prune.surgery import child_spec
from mnv3_search.spec.arch import ArchSpec
from mnv3_search.spec.yaml_io import spec_to_yaml
from support.tiny_run import MICRO_ARGS, MICRO_SPEC_PATH

HYBRID_BUDGET = "1.0M-macs"  # the micro network (1,335,808 MACs): 7 iterations, so --max-iterations 2 stops it


def with_cuts(spec: ArchSpec, cuts: dict[str, int]) -> ArchSpec:
    for group, channels in cuts.items():
        spec = child_spec(spec, group, channels)
    return spec


def parse_cuts(text: str) -> dict[str, int]:
    """iterations.csv's and proposals.csv's naming of a choice, `exp2=72,last_conv=120`, back to cuts."""
    return {group: int(channels) for group, channels in (part.split("=") for part in text.split(","))}


@pytest.fixture(scope="module")
def micro_parent(micro_run: Path) -> Parent:
    """The session's trained micro seed as an iteration's parent."""
    spec, state = read_checkpoint(micro_run / "seed.pt")
    return Parent(spec, state, float(spec_macs(spec)), 0.5, "seed.pt")


def test_the_knapsack_proposal_cuts_several_groups_to_the_goal(micro_parent: Parent) -> None:
    pricing = Pricing(parse_budget("1M-macs"))
    data = load_dataset("digits", resolution=32, holdout=0.1, limit=240, seed=0)
    importance = Taylor(data, num_batches=4)
    source = KnapsackProposal(pricing, 8, importance)
    parent = micro_parent
    groups = proposal_groups(parent.spec, 8)
    for share in (0.9, 0.8, 0.6):
        goal = share * parent.resource
        proposal, = source.propose(parent, goal)
        assert (proposal.name, proposal.kind) == (KNAPSACK_PROPOSAL, KNAPSACK_PROPOSAL)
        assert len(proposal.cuts) >= 2 and not proposal.cuts_one_group
        assert dict(proposal.before) == {g.name: g.channels for g in groups if g.name in proposal.cuts}
        assert all(proposal.cuts[g] < proposal.before[g] for g in proposal.cuts)
        assert spec_to_yaml(proposal.spec) == spec_to_yaml(with_cuts(parent.spec, dict(proposal.cuts)))
        assert goal - 0.01 * parent.resource < proposal.resource == spec_macs(proposal.spec) <= goal
        # the knapsack's shape for that goal, from the same scores: the proposal is it
        scores = importance(parent.spec, parent.state, groups)
        shape, _ = KnapsackProblem.build(parent.spec, scores, pricing.resource, HYBRID_OPTIONS).shape_for(goal)
        assert spec_to_yaml(shape) == spec_to_yaml(proposal.spec)
        # a trial carries a proposal of several cuts by its name and its cuts, a one-group one by its params
        single = OneGroupProposals(pricing, 8).propose(parent, goal)[0]
        assert trial_cut(proposal) == (KNAPSACK_PROPOSAL, None)
        assert cuts_attrs(proposal) == {CUTS_ATTR: dict(proposal.cuts)}
        assert trial_cut(single) == (single.name, single.cuts[single.name]) and cuts_attrs(single) == {}
    # 3 % below the parent the knapsack cuts one group only, which NetAdapt's own proposal for it covers
    scores = importance(parent.spec, parent.state, groups)
    shape, _ = KnapsackProblem.build(parent.spec, scores, pricing.resource, HYBRID_OPTIONS).shape_for(
        0.97 * parent.resource)
    assert sum(w != g.channels for g, w in zip(groups, widths_of(shape, groups))) == 1
    assert source.propose(parent, 0.97 * parent.resource) == []
    assert source.propose(parent, 0.01 * parent.resource) == []  # no shape meets it


@pytest.fixture(scope="module")
def hybrid_run(micro_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro network from the session's micro seed to HYBRID_BUDGET, stopped by --max-iterations 2 and
    resumed with the same command and a higher limit: what a multi-cut proposal's records must survive."""
    out = tmp_path_factory.mktemp("hybrid") / "run"
    args = ["netadapt", str(MICRO_SPEC_PATH), "--budget", HYBRID_BUDGET, "--method", "hybrid", "--weights",
            str(micro_run / "seed.pt"), "--out", str(out), *MICRO_ARGS]
    stopped = CliRunner().invoke(cli, [*args, "--max-iterations", "2"])
    assert stopped.exit_code == 3 and "stopped after --max-iterations 2" in stopped.output, stopped.output
    done = CliRunner().invoke(cli, [*args, "--max-iterations", "20"])
    assert done.exit_code == 0, done.output
    return out


def test_a_hybrid_run_weighs_the_knapsack_cut_beside_netadapts_proposals(hybrid_run: Path) -> None:
    folder = RunFolder(hybrid_run)
    iterations = pd.read_csv(folder.iterations_csv)
    proposals = pd.read_csv(folder.proposals_csv)
    assert len(iterations) > 3 and spec_macs(load_spec(hybrid_run / "final.yaml")) <= 1_000_000
    chosen_knapsack = proposed = 0
    for row in iterations[iterations["iteration"] > 0].itertuples():
        parent_path = folder.seed_checkpoint if row.iteration == 1 else folder.iteration_checkpoint(row.iteration - 1)
        parent, _ = read_checkpoint(parent_path)
        spec, state = read_checkpoint(folder.iteration_checkpoint(row.iteration))
        # the chosen network is its parent with the chosen cuts, whichever kind of proposal won
        assert spec_to_yaml(spec) == spec_to_yaml(with_cuts(parent, parse_cuts(row.proposal)))
        build_model(spec).load_state_dict(state, strict=True)
        mine = proposals[proposals["iteration"] == row.iteration]
        knapsack = mine[mine["group"] == KNAPSACK_PROPOSAL]
        # none where the knapsack cuts one group only (NetAdapt's proposal for that group covers it)
        assert len(knapsack) <= 1 and len(mine) == len(proposal_groups(parent, 8)) + len(knapsack)
        proposed += len(knapsack)
        for cuts_text, macs, channels in zip(knapsack["cuts"], knapsack["macs"], knapsack["channels"]):
            cuts = parse_cuts(cuts_text)
            assert len(cuts) >= 2 and pd.isna(channels) and macs == spec_macs(with_cuts(parent, cuts))
        singles = mine[mine["group"] != KNAPSACK_PROPOSAL]
        assert (singles["cuts"] == singles["group"] + "=" + singles["channels"].astype(int).astype(str)).all()
        chosen = mine[mine["chosen"]]
        assert len(chosen) == 1 and chosen["cuts"].iloc[0] == row.proposal
        chosen_knapsack += int(chosen["group"].iloc[0] == KNAPSACK_PROPOSAL)
    # in this run (deterministic: one thread, seeded) the knapsack proposes in 6 of 7 iterations and its cut
    # wins iterations 3 and 6 by dAcc/|dMACs|
    assert proposed >= len(iterations) - 3 and chosen_knapsack >= 1
    study = optuna.load_study(study_name=hybrid_run.resolve().name,
                              storage=make_storage(folder.default_storage_url))
    for t in study.get_trials():
        if t.params["group"] == KNAPSACK_PROPOSAL:
            assert set(t.params) == {"group"} and len(t.user_attrs[CUTS_ATTR]) >= 2
        else:
            assert set(t.params) == {"group", "channels"} and CUTS_ATTR not in t.user_attrs
