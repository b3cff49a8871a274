"""ONNX's own Attention op (opset 23): heads prune as units through it, in its 4-D form (a head
split upstream, what the dynamo exporter writes for scaled_dot_product_attention) and its 3-D form
(q_num_heads / kv_num_heads attributes, rewritten to the kept count). Parity with the masked
original at two batch sizes and a second sequence length; what it cannot follow freezes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphprune.parity import compare
from graphprune.planner import Budget, make_plan
from graphprune.rewriter import apply_plan, masked_original
from graphprune.tracer import to_graph, trace
from tests.helpers import const, ints, load_via_file

C, H, D = 32, 4, 8


def _model(three_d: bool, *, kv_heads: int = H, mask=None, causal: int = 0, present: bool = False,
           softcap: float | None = None) -> onnx.ModelProto:
    """x (B, S, C) -> q/k/v projections -> Attention -> output projection -> y (B, S, 8)."""
    nodes, inits = [], [const("wq", (C, C)), const("wk", (C, kv_heads * D)), const("wv", (C, kv_heads * D)),
                        const("bq", (C,)), const("wo", (C, 8))]
    for p in "qkv":
        nodes.append(helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"{p}_proj"))
    nodes.append(helper.make_node("Add", ["q0", "bq"], ["q1"], name="q_bias"))
    src = {"q": "q1", "k": "k0", "v": "v0"}
    attrs = {"is_causal": causal}
    if softcap is not None:
        attrs["softcap"] = softcap
    if three_d:
        ins = [src["q"], src["k"], src["v"]]
        attrs.update(q_num_heads=H, kv_num_heads=kv_heads)
    else:
        inits += [ints("split_q", [0, 0, H, D]), ints("split_kv", [0, 0, kv_heads, D])]
        ins = []
        for p in "qkv":
            nodes += [helper.make_node("Reshape", [src[p], "split_q" if p == "q" else "split_kv"], [f"{p}4"], name=f"{p}_split"),
                      helper.make_node("Transpose", [f"{p}4"], [f"{p}t"], name=f"{p}_t", perm=[0, 2, 1, 3])]
            ins.append(f"{p}t")
    if mask is not None:
        inits.append(onnx.numpy_helper.from_array(mask, "mask"))
        ins.append("mask")
    outs = ["a", "pk", "pv"] if present else ["a"]
    nodes.append(helper.make_node("Attention", ins, outs, name="attn", **attrs))
    if three_d:
        merged = "a"
    else:
        inits.append(ints("merge", [0, 0, C]))
        nodes += [helper.make_node("Transpose", ["a"], ["at"], name="a_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["at", "merge"], ["am"], name="a_merge")]
        merged = "am"
    nodes.append(helper.make_node("MatMul", [merged, "wo"], ["y"], name="out_proj"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])]
    if present:
        outputs.append(helper.make_tensor_value_info("pk", TensorProto.FLOAT, ["B", H, "S", D]))
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", C])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _attention_group(tr, kv_heads: int = H):
    """The group of the q projection's channels: one unit per k/v head (with its q heads)."""
    g = next(g for g in tr.groups if any(s.node == "q_proj" for s in g.sources))
    assert g.size == kv_heads and {s.node for s in g.sources} == {"q_proj", "k_proj", "v_proj"}, g
    return g


def _trace(model):
    return trace(to_graph(model), 23, {"x": (1, 5, C)})


def _prune(model, keep=0.5, seed=0):
    model = load_via_file(model)
    tr = _trace(model)
    rng = np.random.default_rng(seed)
    scores = {g.id: rng.random(g.size) for g in tr.groups if g.prunable}
    plan = make_plan(tr, scores, Budget("channels", keep, cap=0.95))
    removed = tr.removed_roots(plan.removed)
    pruned = onnx.shape_inference.infer_shapes(apply_plan(tr, removed, model))
    return tr, model, removed, pruned


def _check_parity(tr, model, removed, pruned):
    res = compare(masked_original(tr, removed, model), pruned, batches=(1, 3), shapes={"x": [1, 5, C]},
                  second={"x": [2, 9, C]})
    assert res["ok"], res
    return res


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _attrs(n):
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
@pytest.mark.parametrize("causal", [0, 1])
def test_heads_prune_through_the_attention_op(three_d, causal):
    tr, model, removed, pruned = _prune(_model(three_d, causal=causal))
    g = _attention_group(tr)
    assert g.prunable, g
    wq = {i.name: tuple(i.dims) for i in pruned.graph.initializer}["wq"]
    assert wq[1] == C // 2 and wq[1] % D == 0  # whole heads: two of four
    if three_d:
        a = _attrs(_node(pruned, "attn"))
        assert a["q_num_heads"] == a["kv_num_heads"] == H // 2
    else:
        split = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
        assert any(list(v) == [0, 0, H // 2, D] for v in split.values() if v.ndim == 1 and len(v) == 4)
    _check_parity(tr, model, removed, pruned)


@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
def test_mask_broadcast_over_heads_and_softcap_prune(three_d):
    rng = np.random.default_rng(1)
    mask = (rng.random((1, 1, 5, 5)) > 0.3)
    mask[..., 0] = True
    m = _model(three_d, mask=mask.astype(bool), softcap=2.0)
    tr, model, removed, pruned = _prune(m)
    assert _attention_group(tr).prunable
    res = compare(masked_original(tr, removed, model), pruned, batches=(1, 3), shapes={"x": [1, 5, C]})
    assert res["ok"], res


@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
def test_grouped_query_heads_prune_by_kv_group(three_d):
    """Grouped-query attention (4 q heads, 2 k/v heads: q heads 0-1 read kv head 0, 2-3 kv head 1):
    a unit is one kv head with its two q heads; removing one leaves q_num_heads 2, kv_num_heads 1
    (3-D) or head splits of 2 and 1 (4-D); parity at two batches and a second length."""
    tr, model, removed, pruned = _prune(_model(three_d, kv_heads=2, causal=1))
    g = _attention_group(tr, kv_heads=2)
    assert g.prunable
    dims = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert dims["wq"][1] == C // 2 and dims["wk"][1] == D and dims["wv"][1] == D and dims["wo"][0] == C // 2
    if three_d:
        a = _attrs(_node(pruned, "attn"))
        assert (a["q_num_heads"], a["kv_num_heads"]) == (2, 1)
    _check_parity(tr, model, removed, pruned)


def test_q_heads_not_a_multiple_of_kv_heads_freeze():
    """4 q heads over 3 k/v heads (3-D attributes): no whole groups, so the heads stay."""
    m = _model(True, kv_heads=3)
    tr = _trace(load_via_file(m))
    frozen = [g for g in tr.groups if any(s.node == "q_proj" for s in g.sources)]
    assert frozen and not any(g.prunable for g in frozen)
    assert "whole groups" in " ".join(r for g in frozen for r in g.frozen)


@pytest.mark.parametrize("case", ["per_head_mask", "present"])
def test_what_the_rule_cannot_follow_freezes(case):
    if case == "per_head_mask":
        m, word = _model(False, mask=np.zeros((1, H, 5, 5), np.float32)), "per-head mask"
    else:
        m, word = _model(False, present=True), "KV cache"
    model = load_via_file(m)
    tr = _trace(model)
    frozen = [g for g in tr.groups if any(s.node == "q_proj" for s in g.sources)]
    assert frozen and not any(g.prunable for g in frozen)
    text = " ".join(str(r) for g in frozen for r in (g.frozen or []))
    assert word in text, text


@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
def test_latency_model_times_the_attention_op(three_d, tmp_path, monkeypatch):
    """--round-to auto and --keep-latency: the Attention op is timed whole at full size (a real
    onnxruntime session of one Attention node) and its time scales with the kept heads, so removing
    a head saves its share of it."""
    from graphprune import latency
    from graphprune.cost import CostModel
    from graphprune.latency import LatencyTable, layer_spec, pair_spec

    tr = _trace(load_via_file(_model(three_d, causal=1)))
    (att,) = [L for L in tr.state.layers if L.op == "Attention"]
    spec = pair_spec(tr, att)
    assert spec["op"] == "Attention" and spec["q"] == ([1, 5, C] if three_d else [1, H, 5, D])
    assert spec["attrs"]["is_causal"] == 1 and att.out_size == H
    table = LatencyTable("cpu", batch=2, cache=tmp_path / "lat.json", threads=1)
    timed = [L for L in tr.state.layers if layer_spec(tr, L) is not None]
    cm = CostModel(tr)
    assert cm.add_latency(table) == len(timed) + 1
    ms = table.pair_ms(spec)
    assert ms > 0 and sum(1 for k in table.cache if "|pair|" in k) == 1
    head = _attention_group(tr)
    with_att = -cm.delta(head.units[:1], "latency")
    monkeypatch.setattr(latency, "pair_spec", lambda trace, layer: None)
    without = CostModel(tr)
    assert without.add_latency(table) == len(timed)
    assert with_att - -without.delta(head.units[:1], "latency") == pytest.approx(ms / H, rel=1e-9)


@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
def test_macs_count_the_attention_op_per_head(three_d):
    """MACs at S = 5 (per sample): q/k/v projections 3·S·C·C, output projection S·C·8, and per head
    S·S scores of D MACs plus S·D outputs of S MACs; half the heads removed halves the last term."""
    from graphprune.cost import CostModel, model_costs

    tr = _trace(load_via_file(_model(three_d)))
    S = 5
    attention = H * S * S * (D + D)
    assert model_costs(tr)["macs"] == 3 * S * C * C + S * C * 8 + attention
    head = _attention_group(tr)
    cm = CostModel(tr)
    # two heads: their rows of q/k/v, columns of the output projection, and their attention MACs
    assert -cm.delta(head.units[:2], "macs") == 2 * (3 * S * C * D + S * D * 8) + attention // 2
