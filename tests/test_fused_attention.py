"""Fused attention kernels (onnxruntime's com.microsoft ops, ONNX's own Attention op at opset 23)
keep their heads inside one node: the channels that reach them freeze with a reason that says so,
the rest of the model still prunes and verifies."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.pipeline import PruneConfig, inspect, prune
from graphprune.planner import Budget

C, H = 16, 4


def _fused_model(path) -> str:
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"], name="embed"),
        helper.make_node("Attention", ["h", "w_qkv", "b_qkv"], ["a"], name="attn", domain="com.microsoft", num_heads=H),
        helper.make_node("MatMul", ["a", "w_fc1"], ["f"], name="fc1"),
        helper.make_node("Relu", ["f"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w_fc2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 10])],
        [w("w_in", 8, C), w("w_qkv", C, 3 * C), w("b_qkv", 3 * C), w("w_fc1", C, 32), w("w_fc2", 32, 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)
    return str(path)


def test_fused_com_microsoft_attention_freezes_with_its_own_reason(tmp_path):
    path = _fused_model(tmp_path / "fused.onnx")
    info = inspect(path, {"x": [1, 6, 8]})
    frozen = [g for g in info["groups"] if g["size"] == C]
    assert len(frozen) == 1 and not frozen[0]["prunable"]
    assert frozen[0]["frozen"][0].startswith("fused com.microsoft::Attention"), frozen[0]["frozen"]
    mlp = next(g for g in info["groups"] if g["size"] == 32)
    assert mlp["prunable"]
    rep = prune(path, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5, best_effort=True),
                                                        input_shapes={"x": [1, 6, 8]}))
    assert rep["verification"]["ok"], rep["verification"]
    kept = {tuple(i.dims) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    assert (C, 3 * C) in kept and any(d[0] == C and d[1] < 32 for d in kept if len(d) == 2)


def test_onnx_attention_op_prunes_heads(transformer_model, tmp_path):
    """The dynamo exporter at opset 23 writes scaled_dot_product_attention as ONNX's Attention op:
    its heads prune as units like the MatMul/Softmax form's (graphprune/rules/heads.py:
    AttentionRule), and the pruned model equals the masked original (batch 1 and 3; a second
    sequence length is checked on hand-built graphs in test_attention_op.py)."""
    from samples import transformers

    path = transformer_model("vit_sep", "dynamo-opset23")
    assert any(n.op_type == "Attention" for n in onnx.load(path, load_external_data=False).graph.node)
    x = transformers.example_input("vit_sep", 1, 0)
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    info = inspect(path, {name: list(x.shape)})
    reasons = [r for g in info["groups"] for r in g["frozen"]]
    assert not any("Attention" in r for r in reasons), reasons
    heads = [g for g in info["groups"] if g["prunable"] and g["channels_per_unit"] > 1]
    assert heads, info["groups"]
    out = tmp_path / "p.onnx"
    rep = prune(path, out, PruneConfig(budget=Budget("channels", 0.5, best_effort=True),
                                       input_shapes={name: list(x.shape)}))
    assert rep["verification"]["ok"], rep["verification"]
    cut = [g for g in rep["groups"] if g["channels_per_unit"] > 1 and g["kept"] < g["size"]]
    assert cut, rep["groups"]
    attn = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Attention"]
    assert attn, "the pruned model lost its Attention ops"
