"""`--round-to auto`: widths snapped to measured latency staircases, the budget still met, the
tables cached. A staircase table (the real LatencyTable, its onnxruntime timing replaced by a
deterministic cost of 16-channel blocks) checks the logic exactly; the real tables run too."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune import planner
from graphprune.cli import build_parser, config_from_args
from graphprune.config import PruneConfig, resolved
from graphprune.cost import CostModel
from graphprune.errors import UserError
from graphprune.latency import LatencyTable, candidate_widths, frontier, snap_width
from graphprune.planner import Budget, make_plan
from tests.helpers import trace_of
from tests.test_planner import chain, scores_for


class StaircaseTable(LatencyTable):
    """A LatencyTable whose timings come from the models it builds: every Conv/MatMul costs its MACs
    with both channel counts rounded up to whole blocks of 16 (what blocked kernels do)."""

    def _time_many(self, items, runs=None):
        out = []
        for model, feeds in items:
            shapes = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
            x = next(iter(feeds.values())).shape
            total = 0.0
            for node in model.graph.node:
                if node.op_type in ("Conv", "MatMul") and node.input[1] in shapes:
                    w = shapes[node.input[1]]
                    cout, cin = (w[0], w[1]) if node.op_type == "Conv" else (w[1], w[0])
                    k = int(np.prod(w[2:])) if node.op_type == "Conv" else 1
                    total += math.ceil(cout / 16) * 16 * math.ceil(cin / 16) * 16 * k * int(np.prod(x[2:]))
            out.append(total * 1e-6)
        return out


def test_candidate_widths_are_few_and_in_range():
    for planned, full in [(45, 64), (1, 2048), (1000, 2048), (3, 3), (130, 256)]:
        c = candidate_widths(planned, full)
        assert planned in c and full in c and len(c) <= 10 and all(1 <= w <= full for w in c)
    assert candidate_widths(45, 64) == [32, 40, 44, 45, 48, 64]
    assert all(w % 3 == 0 for w in candidate_widths(45, 96, unit=3))  # whole units only
    assert min(candidate_widths(45, 64, lowest=41)) >= 41


def test_frontier_and_snap_on_a_staircase():
    t = {32: 3.0, 40: 3.78, 44: 3.77, 45: 3.80, 48: 3.79, 64: 4.97}
    assert frontier(t) == [32, 48, 64]
    assert snap_width(45, t) == 32  # 33..47 cost what 48 costs: the fastest width not above 45 is 32
    assert snap_width(48, t) == 48 and snap_width(60, t) == 48 and snap_width(64, t) == 64
    assert snap_width(45, t, lowest=40) == 45  # nothing on the frontier in [40, 45]: keep the plan
    smooth = {w: float(w) for w in (8, 12, 16, 20)}
    assert frontier(smooth) == [8, 12, 16, 20] and snap_width(20, smooth) == 20


@pytest.fixture
def table(tmp_path):
    return StaircaseTable("cpu", 2, tmp_path / "lat.json", shapes=None)


@pytest.mark.parametrize("rank", [False, True])
def test_auto_snaps_to_blocks_and_still_meets_the_budget(tmp_path, table, monkeypatch, rank):
    monkeypatch.setattr(planner, "RANK_BY_LATENCY", rank)
    tr = trace_of(chain((64, 64, 64), spatial=8))
    scores = scores_for(tr)
    table.shapes = tr.input_shapes
    plan = make_plan(tr, scores, Budget("flops", 0.5, round_to="auto"), latency_table=table)
    assert plan.budget_met and plan.after["macs"] <= 0.5 * plan.before["macs"] * (1 + 1e-9)
    assert plan.snapped, "every pruned group is reported"
    for s in plan.snapped:
        g = tr.groups[s["group"]]
        assert s["snapped"] <= s["planned"] and s["final"] == g.size - len(plan.removed.get(g.id, []))
        assert s["final"] % 16 == 0, s  # on this staircase only whole blocks are worth keeping
        assert set(s["frontier"]) <= {int(w) for w in s["candidates_ms"]}
    assert plan.snap_info["provider"] == "cpu" and plan.snap_info["batch"] == 2
    # the same plan with round_to 1 has off-block widths: snapping changed something
    plain = make_plan(tr, scores, Budget("flops", 0.5, round_to=1))
    kept = [g.size - len(plain.removed.get(g.id, [])) for g in tr.groups if g.prunable]
    assert any(k % 16 for k in kept)


def test_auto_spends_what_snapping_saved(table):
    """A budget just below a block edge: snapping alone would leave MACs unused; the refill puts
    whole blocks back while the budget holds, so the result is at least as large as snapping."""
    tr = trace_of(chain((64, 64, 64), spatial=8))
    scores = scores_for(tr, seed=3)
    table.shapes = tr.input_shapes
    planner_rank = planner.RANK_BY_LATENCY
    try:
        planner.RANK_BY_LATENCY = False
        plan = make_plan(tr, scores, Budget("flops", 0.62, round_to="auto"), latency_table=table)
    finally:
        planner.RANK_BY_LATENCY = planner_rank
    assert plan.budget_met
    cm = CostModel(tr)
    for s in plan.snapped:  # cost if every group stayed at its snapped width
        g = tr.groups[s["group"]]
        order = np.argsort(scores[g.id], kind="stable")
        cm.remove(g.units[order[:g.size - s["snapped"] // g.channels_per_unit]])
    snapped_only = cm.totals["macs"]
    assert plan.after["macs"] >= snapped_only - 1e-6
    assert plan.snap_info["refill_steps"] > 0  # this budget leaves room for a block once snapped
    assert plan.after["macs"] > snapped_only and any(s["final"] > s["snapped"] for s in plan.snapped)


def test_auto_with_real_onnxruntime_tables_is_cached(tmp_path):
    tr = trace_of(chain((32, 48, 32), spatial=8))
    scores = scores_for(tr)
    cache = tmp_path / "lat.json"
    hw = {"provider": "cpu", "batch": 2, "cache": str(cache), "threads": 1}
    plan = make_plan(tr, scores, Budget("flops", 0.5, round_to="auto", hardware=hw))
    assert plan.budget_met and plan.after["macs"] <= 0.5 * plan.before["macs"] * (1 + 1e-9)
    assert plan.snap_info["layer_axes_measured"] > 0 and cache.exists()
    entries = json.loads(cache.read_text())
    assert any("|ctx|" in k for k in entries) and all("|t1" in k for k in entries)
    for s in plan.snapped:
        assert s["snapped"] <= s["planned"] and len(s["candidates_ms"]) <= 10
        assert all(v > 0 for v in s["candidates_ms"].values())
    again = make_plan(tr, scores, Budget("flops", 0.5, round_to="auto", hardware=hw))
    assert again.snap_info["layer_axes_measured"] == 0  # every table from the cache
    assert {g: list(v) for g, v in again.removed.items()} == {g: list(v) for g, v in plan.removed.items()}


def test_budget_round_to_values():
    assert Budget("flops", 0.5).round_to == 1 and Budget("latency", 0.5).round_to == "auto"
    assert Budget("flops", 0.5, round_to="AUTO").round_to == "auto"
    assert Budget("flops", 0.5, round_to="8").round_to == 8
    for bad in ("fast", 0, "-1"):
        with pytest.raises(UserError):
            Budget("flops", 0.5, round_to=bad)


def test_cli_defaults_and_config(tmp_path):
    p = build_parser()
    compress = p.parse_args(["compress", "m.onnx", "-o", "o.onnx"])
    assert config_from_args(compress, default_budget=("flops", 0.5)).budget.round_to == "auto"
    prune = p.parse_args(["prune", "m.onnx", "-o", "o.onnx", "--keep-flops", "0.5"])
    assert config_from_args(prune).budget.round_to == 1
    lat = p.parse_args(["prune", "m.onnx", "-o", "o.onnx", "--keep-latency", "0.5", "--provider", "cuda",
                        "--latency-batch", "4", "--latency-threads", "2"])
    b = config_from_args(lat).budget
    assert b.round_to == "auto" and b.hardware == {"provider": "cuda", "batch": 4, "cache": None, "threads": 2,
                                                   "precision": "fp32"}
    explicit = p.parse_args(["compress", "m.onnx", "-o", "o.onnx", "--round-to", "16"])
    assert config_from_args(explicit, default_budget=("flops", 0.5)).budget.round_to == 16
    with pytest.raises(SystemExit):
        p.parse_args(["prune", "m.onnx", "-o", "o.onnx", "--keep-flops", "0.5", "--round-to", "fast"])
    # the Python API: resolved() tells an auto budget where to measure
    cfg = resolved(PruneConfig(budget=Budget("flops", 0.5, round_to="auto"), provider="cpu", latency_batch=4))
    assert cfg.budget.hardware == {"provider": "cpu", "batch": 4, "cache": None}


def test_prune_round_to_auto_end_to_end(tmp_path, monkeypatch):
    """The real pipeline on a sample model: verified, under budget, report records round_to auto."""
    from graphprune.pipeline import prune

    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    src = tmp_path / "chain.onnx"
    onnx.save(chain((32, 48, 32), spatial=8), src)
    rep = prune(src, tmp_path / "out.onnx", PruneConfig(budget=Budget("flops", 0.5, round_to="auto"),
                                                         latency_batch=2))
    assert rep["budget"]["round_to"] == "auto" and rep["budget_met"] and rep["verification"]["ok"]
    assert rep["totals"]["macs_ratio"] <= 0.5 + 1e-9
    assert (tmp_path / "latency.json").exists()
