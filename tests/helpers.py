"""Shared test helpers: build tiny graphs, prune them at random, check masked parity."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.io import check_output, load_model, opset_of
from graphprune.pipeline import signature
from graphprune.planner import Budget, make_plan
from graphprune.rewriter import apply_plan, masked_original, masked_view
from graphprune.tracer import Trace, to_graph, trace
from graphprune.parity import compare

RNG = np.random.default_rng(0)


def const(name: str, shape, rng=RNG, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    """inputs/outputs: [(name, shape)] float32; dims may be strings (symbolic) or None."""
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def load_via_file(model: onnx.ModelProto) -> onnx.ModelProto:
    """Round-trip through a real file and graphprune's loader (checker, constant lifting, shapes)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        onnx.save(model, path)
        return load_model(path)


def trace_of(model: onnx.ModelProto) -> Trace:
    return trace(to_graph(model), opset_of(model))


def prune_random(model: onnx.ModelProto, *, keep: float = 0.5, seed: int = 0, rtol: float = 1e-4,
                 expect_removed: bool = True):
    """Prune every prunable group to `keep` with random scores; assert the pruned model is valid,
    keeps its signature, and equals the masked original. Returns (trace, pruned model, compare result)."""
    model = load_via_file(model)
    tr = trace_of(model)
    rng = np.random.default_rng(seed)
    scores = {g.id: rng.random(g.size) for g in tr.groups if g.prunable}
    plan = make_plan(tr, scores, Budget("channels", keep, cap=0.95))
    removed = tr.removed_roots(plan.removed)
    if expect_removed:
        assert removed, "nothing was pruned"
    pruned = onnx.shape_inference.infer_shapes(apply_plan(tr, removed, model))
    check_output(pruned)
    assert signature(pruned) == signature(model)
    before = {t.name: np.array(t.values) for t in tr.graph.tensors().values() if hasattr(t, "values")}
    with masked_view(tr, removed, model) as reference:  # zeros written into the trace graph's arrays
        res = compare(reference, pruned, rtol=rtol)
    after = {t.name: np.asarray(t.values) for t in tr.graph.tensors().values() if hasattr(t, "values")}
    assert all(np.array_equal(before[k], after[k]) for k in before), "masked_view did not restore the weights"
    assert res["ok"], res
    # the self-contained masked original (a ModelProto, weights copied) agrees with the in-place view
    res_proto = compare(masked_original(tr, removed, model), pruned, rtol=rtol)
    assert res_proto["ok"], res_proto
    return tr, pruned, res


def record_gauss_newton_draws(monkeypatch) -> list:
    """Record every Gaussian draw of the sampled Fisher (``SampleSeeds.normal``) into the returned
    list, so a test can rebuild the targets the statistics used (dense output + drawn noise)."""
    from graphprune.curvature import data as D

    drawn, normal = [], D.SampleSeeds.normal

    def spy(self, part, shape):
        t = normal(self, part, shape)
        drawn.append(t.numpy().copy())
        return t

    monkeypatch.setattr(D.SampleSeeds, "normal", spy)
    return drawn
