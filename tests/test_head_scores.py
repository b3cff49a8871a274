"""Curvature scores and compensation on attention heads: the Taylor score of a head is the squared
derivative of the loss with respect to a gate on that head's context output (checked by central
differences in onnxruntime), and layer-wise OBS on the output projection lowers the error of
removing heads, as it does for conv channels."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from graphprune.criteria import make_criterion
from graphprune.curvature.compensate import compensate
from graphprune.runtime import run
from tests.helpers import load_via_file
from tests.test_attention import Block, C, H
from tests.test_criteria import ce, stats_for

D = C // H


@pytest.fixture(scope="module")
def attention_block(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("heads") / "block.onnx"
    torch.onnx.export(Block(packed=True, sdpa=False).eval(), (torch.randn(1, 6, 16),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "B"}})
    model = load_via_file(onnx.load(str(path)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 6, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 48)
    proj = next(n for n in model.graph.node if n.op_type == "MatMul" and "proj" in n.name)
    return model, x, labels, proj.input[1]


def _with(model, name, values):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    return m


def _head_group(tr):
    return next(g for g in tr.groups if g.prunable and g.size == H)


def _proj_weight(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name)).astype(np.float64)


@pytest.mark.parametrize("batches", [1, 2])
def test_taylor_head_score_is_the_squared_gate_derivative(attention_block, batches):
    model, x, labels, wname = attention_block
    crit = make_criterion("taylor")
    tr, ctx = stats_for(model, x, labels, "labels", set(crit.needs), crit, batch_size=len(x) // batches)
    g = _head_group(tr)
    score = crit.score(ctx)[g.id]
    w = _proj_weight(model, wname)  # (in, out): input row h*D + d is channel d of head h
    eps, expected = 1e-3, np.zeros(H)
    for h in range(H):
        for b in range(batches):
            sl = slice(b * len(x) // batches, (b + 1) * len(x) // batches)
            vals = []
            for z in (1 + eps, 1 - eps):
                wz = w.copy()
                wz[h * D:(h + 1) * D] *= z
                vals.append(ce(run(_with(model, wname, wz), {"x": x[sl]})[0].astype(np.float64), labels[sl]))
            expected[h] += ((vals[0] - vals[1]) / (2 * eps)) ** 2 / batches
    heads_in = tr.state.infos[tr.graph_node(next(n.name for n in tr.graph.nodes if "proj" in n.name)).inputs[0].name]
    order = [int(tr.unit_pos[tr.roots[heads_in.ids[h * D]]]) for h in range(H)]  # unit of head h
    np.testing.assert_allclose(score[order], expected, rtol=3e-2, atol=1e-8)


def test_obs_on_the_output_projection_lowers_the_error_of_removing_heads(attention_block):
    model, x, labels, wname = attention_block
    crit = make_criterion("fisher")
    tr, ctx = stats_for(model, x, labels, "labels", set(crit.needs) | {"kfac"}, crit, damping=1e-3)
    g = _head_group(tr)
    removed = {int(r) for r in g.units[:2]}  # two of the four heads
    keep = tr.kept_fn(removed)
    dense = run(model, {"x": x})[0]
    heads_in = tr.state.infos[next(n for n in tr.graph.nodes if "proj" in n.name).inputs[0].name]
    gone = ~keep(heads_in.ids)
    w = _proj_weight(model, wname)
    plain = w.copy()
    plain[gone] = 0.0  # the removed heads' context never reaches the output projection
    updates = compensate(ctx, keep, "obs", damping=1e-3)
    assert wname in updates
    comp_w = np.asarray(updates[wname], dtype=np.float64)
    assert np.all(comp_w[gone] == 0)
    err_plain = np.mean((run(_with(model, wname, plain), {"x": x})[0] - dense) ** 2)
    m = _with(model, wname, comp_w)
    bias = next((n for n in updates if n != wname), None)
    if bias is not None:
        m = _with(m, bias, np.asarray(updates[bias]))
    err_comp = np.mean((run(m, {"x": x})[0] - dense) ** 2)
    assert err_comp < 0.7 * err_plain, (err_comp, err_plain)
