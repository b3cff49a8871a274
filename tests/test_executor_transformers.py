"""The ONNX -> PyTorch executor runs every transformer sample (both exporters) like onnxruntime, differentiably.

Each model is exported once per session, loaded the way graphprune loads it (``load_and_trace`` at the
model's input size, executor built on the trace's graph with shared weights) and compared with
onnxruntime at batch 1 and 3 (and at a second sequence length / width where the export keeps it dynamic).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from converters.onnx_to_torch import LAYER_OPS, TorchGraph
from graphprune.pipeline import load_and_trace
from samples import transformers as T
from tests.test_executor import RTOL, rel_error

# (name, exporter, extra export kwargs)
CASES = [(n, e) for n in T.NAMES for e in ("torchscript", "dynamo")] + [("vit_sep", "dynamo-opset23")]


# transformer_model(name, variant): the session fixture in tests/conftest.py (shared with
# tests/test_transformer_zoo.py, so each model is exported once per run)


def _dynamic_axis(path: str) -> int | None:
    """The non-batch symbolic input axis of an exported file, if any."""
    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return next((i for i, d in enumerate(dims) if i and not d.HasField("dim_value")), None)


def check_executor(path: str, shape: list[int], inputs: list[np.ndarray]) -> float:
    """Parity with onnxruntime on ``inputs`` and gradients to every layer weight; returns the worst error."""
    _, tr = load_and_trace(path, {"input": shape})
    tg = TorchGraph(tr.graph, share_weights=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        ref = sess.run(None, {name: x})
        with torch.no_grad():
            got = tg(torch.from_numpy(x))
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            err = rel_error(r, g)
            assert err < RTOL, (x.shape, err)
            worst = max(worst, err)

    layer_weights = {n.inputs[1].name for n in tg.graph.nodes if n.op in LAYER_OPS and len(n.inputs) > 1}
    assert layer_weights & set(tg.param_names()), "no trainable layer weights"
    tg.zero_grad()
    tg(torch.from_numpy(inputs[-1]))[0].square().mean().backward()
    for p in tg.param_names():
        g = tg.param(p).grad
        assert g is not None and torch.isfinite(g).all(), p
        assert g.abs().sum() > 0, f"no gradient reaches {p}"
    return worst


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_transformer_sample_matches_onnxruntime_and_is_differentiable(name, variant, transformer_model):
    path = transformer_model(name, variant)
    shape = list(T.input_shape(name))
    inputs = [T.example_input(name, b, seed=b).numpy() for b in (1, 3)]
    axis = _dynamic_axis(path)
    if axis is not None:  # the graph's shape arithmetic at another length than the one it was traced at
        dim = T.DYNAMIC[name]["input"][axis]
        inputs.insert(1, T.example_input(name, 2, seed=5, size=T.SECOND_SIZES[dim]).numpy())
    if variant == "dynamo-opset23":
        assert "Attention" in {n.op_type for n in onnx.load(path).graph.node}
    check_executor(path, shape, inputs)


@pytest.mark.parametrize("path,shape", [("samples/digits_vit.onnx", [1, 1, 8, 8]),
                                        ("samples/digits_encoder.onnx", [1, 4, 16])])
def test_digits_transformers_match_onnxruntime(path, shape):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([b, *shape[1:]]).astype(np.float32) for b in (1, 3)]
    check_executor(path, shape, inputs)


# --------------------------------------------------------------------------- ops beyond the exported samples
def _model(nodes, inputs, opset):
    def vi(n, a):
        return helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)

    outs = [helper.make_empty_tensor_value_info(o) for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "t", [vi(n, a) for n, a in inputs.items()], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _f(*shape, seed=0):
    return np.random.default_rng(seed + len(shape) * 7 + sum(shape)).standard_normal(shape).astype(np.float32)


_B, _H, _S, _D = 2, 4, 5, 8
_QKV = {"q": _f(_B, _H, _S, _D), "k": _f(_B, _H, _S, _D, seed=1), "v": _f(_B, _H, _S, _D, seed=2)}
_DEAD = np.ones((_S, _S), bool)
_DEAD[1] = False  # a query row with every key masked: output 0
ATTN = {
    "plain_kv_longer": ([dict(inputs=["q", "k", "v"])],
                        {"q": _QKV["q"], "k": _f(_B, _H, 7, _D), "v": _f(_B, _H, 7, 6)}, 23),
    "causal_gqa": ([dict(inputs=["q", "k", "v"], is_causal=1)],
                   {"q": _QKV["q"], "k": _f(_B, 2, _S, _D), "v": _f(_B, 2, _S, _D)}, 23),
    "3d_heads": ([dict(inputs=["q", "k", "v"], q_num_heads=4, kv_num_heads=2)],
                 {"q": _f(_B, _S, 32), "k": _f(_B, 6, 16), "v": _f(_B, 6, 12)}, 23),
    "bool_mask_dead_row": ([dict(inputs=["q", "k", "v", "m"])], {**_QKV, "m": _DEAD}, 23),
    "float_mask_scale_softcap_modes": (
        [dict(inputs=["q", "k", "v", "m"], outputs=["y", "", "", "qk"], scale=0.3, softcap=2.0,
              qk_matmul_output_mode=2),
         dict(inputs=["q", "k", "v", "m"], outputs=["y3", "", "", "p3"], qk_matmul_output_mode=3)],
        {**_QKV, "m": _f(_B, _H, _S, _S)}, 23),
    "past_kv_causal": ([dict(inputs=["q", "k", "v", "", "pk", "pv"], outputs=["y", "pk2", "pv2"], is_causal=1)],
                       {**_QKV, "pk": _f(_B, _H, 3, _D), "pv": _f(_B, _H, 3, _D)}, 23),
    "nonpad_kv_seqlen": ([dict(inputs=["q", "k", "v", "", "", "", "n"], is_causal=1)],
                         {"q": _QKV["q"], "k": _f(_B, _H, 7, _D), "v": _f(_B, _H, 7, _D),
                          "n": np.array([7, 6], np.int64)}, 24),
}


@pytest.mark.parametrize("case", sorted(ATTN))
def test_attention_op_matches_onnxruntime(case):
    specs, inputs, opset = ATTN[case]
    nodes = [helper.make_node("Attention", s.pop("inputs"), s.pop("outputs", ["y" + str(i)]), **s)
             for i, s in enumerate(dict(s) for s in specs)]
    model = _model(nodes, inputs, opset)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    tg = TorchGraph(model)
    feeds = {k: torch.from_numpy(v).requires_grad_(v.dtype == np.float32) for k, v in inputs.items()}
    got = tg(**feeds)
    for r, g in zip(ref, got):
        assert rel_error(r, g) < RTOL
    sum(t.sum() for t in got).backward()
    assert all(torch.isfinite(t.grad).all() for t in feeds.values() if t.requires_grad)


def test_trilu_and_cumsum_match_onnxruntime():
    nodes = [helper.make_node("Trilu", ["x", "kk"], ["lo"], upper=0), helper.make_node("Trilu", ["x"], ["up"]),
             helper.make_node("CumSum", ["x", "ax"], ["c1"], exclusive=1, reverse=1),
             helper.make_node("CumSum", ["x", "ax0"], ["c2"])]
    inputs = {"x": _f(2, 5, 6), "kk": np.array(1, np.int64), "ax": np.array(-1, np.int64),
              "ax0": np.array(1, np.int64)}
    model = _model(nodes, inputs, 17)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    for r, g in zip(ref, TorchGraph(model)(**inputs)):
        assert rel_error(r, g) < RTOL
