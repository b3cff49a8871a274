"""What makes the statistics cheap (issue 11 point 2) changes no statistic a criterion reads: only the
scored layers are recorded, the backward pass skips weight gradients where nothing reads them (and
falls back where inputs are integers), depthwise convs get no OBS input factor, and the blocked
symmetric product equals the plain one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from converters.onnx_to_torch import TorchGraph
from graphprune.criteria import ScoringContext, make_criterion
from graphprune.curvature.collect import _gram_into, collect
from graphprune.curvature.data import CalibData
from graphprune.curvature.layers import layer_views
from graphprune.pipeline import PruneConfig, collect_statistics, load_and_trace
from graphprune.planner import Budget
from tests.helpers import const, trace_of

ROOT = Path(__file__).resolve().parents[1]
CALIB = str(ROOT / "samples" / "digits_calib.npz")


def _stats(model: str, needs: set[str], scored_only: bool, criterion: str = "fisher"):
    skel, tr = load_and_trace(str(ROOT / "samples" / model), calib=CALIB)
    ctx = ScoringContext(tr)
    cfg = PruneConfig(criterion=criterion, budget=Budget("flops", 0.5), calib=CALIB, samples=48, batch_size=16)
    collect_statistics(skel, tr, ctx, cfg, needs, {}, scored_only=scored_only)
    return tr, ctx


def test_only_scored_layers_are_recorded_and_scores_do_not_change():
    """digits MobileNetV2: its depthwise convs (no in/out members: no criterion reads them) and its
    classifier (whose classes are a graph output) get no statistics; the scores are the same."""
    needs = {"fisher_diag", "kfac_a"}
    tr, full = _stats("digits_mobilenet_v2.onnx", needs, scored_only=False)
    _, part = _stats("digits_mobilenet_v2.onnx", needs, scored_only=True)
    used = {v.node for g in tr.groups if g.prunable for v, _, _ in full.layer_units(g)}
    assert set(part.stats.layers) == used and used < set(full.stats.layers)
    skipped = set(full.views) - used
    assert any(v.groups > 1 for n, v in full.views.items() if n in skipped)  # depthwise convs
    for name in used:
        a, b = full.stats.layers[name], part.stats.layers[name]
        assert a.n == b.n and a.a_count == b.a_count
        torch.testing.assert_close(b.fisher, a.fisher, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.A, a.A, rtol=1e-6, atol=0)
    s_full, s_part = make_criterion("fisher").score(full), make_criterion("fisher").score(part)
    for gid in s_full:
        np.testing.assert_allclose(s_part[gid], s_full[gid], rtol=1e-6)


def test_backward_without_weight_gradients_gives_the_same_statistics():
    """Fisher diagonal and K-FAC factors from the layers' output gradients alone (inputs requiring
    gradients) equal those of a backward pass that also forms weight gradients ("grads": Taylor)."""
    needs = {"fisher_diag", "kfac"}
    _, plain = _stats("digits_resnet.onnx", needs, scored_only=True)
    _, taylor = _stats("digits_resnet.onnx", needs | {"grads"}, scored_only=True, criterion="taylor")
    assert set(plain.stats.layers) == set(taylor.stats.layers)
    for name, a in plain.stats.layers.items():
        b = taylor.stats.layers[name]
        for f in ("fisher", "A", "S"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-6, atol=1e-12)


def test_integer_inputs_fall_back_to_weight_gradients():
    """Token ids -> embedding (Gather) -> MatMul -> Relu -> MatMul: no input can require a gradient,
    so the first forward is redone with the weights requiring them; every layer gets statistics."""
    V, T, K, H, C = 11, 5, 4, 6, 3
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", T])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, C])],
                              [const("E", (V, K)), const("W1", (K, H)), const("W2", (H, C))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tr = trace_of(model)
    views = layer_views(tr.graph, tr.state)
    assert len(views) == 2
    tg = TorchGraph(tr.graph, trainable=[v.weight for v in views.values()])
    ids = np.random.default_rng(0).integers(0, V, (16, T)).astype(np.int64)
    stats = collect(tg, views, CalibData({"ids": ids}, None, "t"), "gauss-newton", {"fisher_diag", "kfac_a"},
                    batch_size=8)
    for st in stats.layers.values():
        assert st.n == 16 and st.fisher is not None and float(st.fisher.abs().sum()) > 0 and st.A is not None
    assert all(p.requires_grad for p in tg.parameters())  # left as found


def test_depthwise_convs_get_no_obs_input_factor():
    skel, tr = load_and_trace(str(ROOT / "samples" / "digits_mobilenet_v2.onnx"), calib=CALIB)
    views = layer_views(tr.graph, tr.state)
    depthwise = [n for n, v in views.items() if v.groups > 1 and v.cols == v.taps]
    assert depthwise
    x = np.load(CALIB)["input"][:16]
    for needs, has_a in (({"kfac_a"}, False), ({"kfac"}, True)):
        tg = TorchGraph(tr.graph, trainable=[n for v in views.values() for n in (v.weight, v.bias) if n])
        stats = collect(tg, views, CalibData({"input": x}, None, "t"), "gauss-newton", needs, batch_size=16)
        for name in depthwise:
            assert stats.layers[name].n == 16 and (stats.layers[name].A is not None) == has_a


@pytest.mark.parametrize("c", [5, 383, 1000])
@pytest.mark.parametrize("per_sample", [False, True])
def test_blocked_symmetric_product(c, per_sample):
    m = torch.randn(3, c, 100) if per_sample else torch.randn(c, 300)  # (N, c, T): Σ_n m_n m_nᵀ
    A = torch.zeros(c + 1, c + 1, dtype=torch.float64)
    _gram_into(A, m)
    flat = m.permute(1, 0, 2).reshape(c, -1) if per_sample else m
    ref = flat.double() @ flat.double().T
    torch.testing.assert_close(A[:c, :c], ref, rtol=1e-5, atol=1e-3)
    assert not A[c].any() and not A[:, c].any()  # the bias row and column are not touched
