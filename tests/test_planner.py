"""Budget planner: targets, per-group cap, rounding, unreachable budgets."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphprune.cost import CostModel
from graphprune.errors import UserError
from graphprune.planner import Budget, make_plan
from tests.helpers import const, load_via_file, make_model, trace_of


def chain(widths=(24, 40, 16), spatial=8):
    nodes, inits, prev = [], [], "x"
    cin = 3
    for i, w in enumerate(widths):
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        inits += [const(f"w{i}", (w, cin, 3, 3)), const(f"b{i}", (w,))]
        prev, cin = f"r{i}", w
    nodes.append(helper.make_node("Conv", [prev, "wo"], ["y"]))
    inits.append(const("wo", (5, cin, 1, 1)))
    return load_via_file(make_model(nodes, [("x", ["N", 3, spatial, spatial])], [("y", ["N", 5, spatial, spatial])], inits))


def scores_for(tr, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in tr.groups if g.prunable}


def test_cost_model_matches_hand_count():
    tr = trace_of(chain())
    cm = CostModel(tr)
    macs = 64 * (24 * 3 * 9 + 40 * 24 * 9 + 16 * 40 * 9 + 5 * 16)
    params = 24 * 27 + 24 + 40 * 24 * 9 + 40 + 16 * 40 * 9 + 16 + 5 * 16
    assert cm.full["macs"] == macs and cm.full["params"] == params


def test_incremental_cost_equals_recount():
    tr = trace_of(chain())
    cm = CostModel(tr)
    g = tr.groups[1]
    cm.remove(g.units[:10])
    macs = 64 * (24 * 3 * 9 + 30 * 24 * 9 + 16 * 30 * 9 + 5 * 16)
    assert cm.totals["macs"] == pytest.approx(macs)


@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.3])
def test_flops_budget_met_and_tight(ratio):
    tr = trace_of(chain())
    plan = make_plan(tr, scores_for(tr), Budget("flops", ratio))
    assert plan.budget_met
    assert plan.after["macs"] <= ratio * plan.before["macs"]
    assert plan.after["macs"] > (ratio - 0.1) * plan.before["macs"]  # does not overshoot wildly


def test_params_budget():
    tr = trace_of(chain())
    plan = make_plan(tr, scores_for(tr), Budget("params", 0.5))
    assert plan.after["params"] <= 0.5 * plan.before["params"]


def test_cap_never_removes_whole_group():
    tr = trace_of(chain())
    plan = make_plan(tr, scores_for(tr), Budget("flops", 0.2, cap=0.5, best_effort=True))
    for g in tr.groups:
        assert len(plan.removed.get(g.id, [])) <= 0.5 * g.size


def test_channels_budget_is_uniform():
    tr = trace_of(chain())
    plan = make_plan(tr, scores_for(tr), Budget("channels", 0.25))
    for g in tr.groups:
        if g.prunable:
            assert g.size - len(plan.removed[g.id]) == int(np.ceil(0.25 * g.size))


def test_lowest_scores_go_first():
    tr = trace_of(chain())
    scores = scores_for(tr)
    plan = make_plan(tr, scores, Budget("channels", 0.5))
    for gid, removed in plan.removed.items():
        kept = np.setdiff1d(np.arange(tr.groups[gid].size), removed)
        assert scores[gid][removed].max() <= scores[gid][kept].min()


@pytest.mark.parametrize("n", [4, 8])
def test_round_to(n):
    tr = trace_of(chain())
    plan = make_plan(tr, scores_for(tr), Budget("flops", 0.5, round_to=n))
    assert plan.budget_met
    for gid, removed in plan.removed.items():
        assert (tr.groups[gid].size - len(removed)) % n == 0


def test_unreachable_budget_is_a_user_error_or_best_effort():
    tr = trace_of(chain())
    with pytest.raises(UserError, match="best-effort"):
        make_plan(tr, scores_for(tr), Budget("flops", 0.01))
    plan = make_plan(tr, scores_for(tr), Budget("flops", 0.01, best_effort=True))
    assert not plan.budget_met and plan.notes and "cannot be met" in plan.notes[0]


@pytest.mark.parametrize("bad", [dict(kind="flops", ratio=0.0), dict(kind="flops", ratio=1.5),
                                 dict(kind="nope"), dict(kind="flops", cap=1.0), dict(kind="flops", round_to=0)])
def test_bad_budgets(bad):
    with pytest.raises(UserError):
        Budget(**bad)


def test_coarse_blocks_are_put_back_while_they_fit():
    """With kept widths rounded to 16 a block is a big step: the greedy pass overshoots the target
    and the refill puts back the most valuable removed blocks that still fit. The plan stays under
    the target, lands closer to it, and every group's removal is still a prefix of its score order."""
    tr = trace_of(chain(widths=(48, 64, 32)))
    scores = scores_for(tr, seed=1)
    budget = Budget("flops", 0.6, round_to=16)
    plan = make_plan(tr, scores, budget)
    assert plan.budget_met and plan.after["macs"] <= 0.6 * plan.before["macs"]
    assert plan.after["macs"] >= 0.5 * plan.before["macs"]  # the greedy pass alone stops at 0.41
    cm = CostModel(tr)
    for gid, units in plan.removed.items():
        order = np.argsort(scores[gid], kind="stable")
        assert sorted(units.tolist()) == sorted(order[:len(units)].tolist())  # a prefix of the score order
        assert (tr.groups[gid].size - len(units)) % 16 == 0
        cm.remove(tr.groups[gid].units[units])
    assert cm.totals["macs"] == pytest.approx(plan.after["macs"])
    # nothing removed could be put back without crossing the target
    for gid, units in plan.removed.items():
        order = np.argsort(scores[gid], kind="stable")
        last = order[len(units) - 16:len(units)]
        assert cm.totals["macs"] + cm.delta(tr.groups[gid].units[last], "macs", sign=+1) > 0.6 * plan.before["macs"]
