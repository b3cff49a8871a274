"""`graphprune prune --lossless`: removes exactly the channels proven identically zero, and the
pruned model computes the same function as the ORIGINAL model (not only the masked one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.helpers import make_model

ROOT = Path(__file__).resolve().parents[1]


def gp(*args, cwd=None) -> subprocess.CompletedProcess:
    """The `graphprune` command run in-process (the real CLI entry point, without paying a Python
    start-up and torch import per call; tests/test_cli.py runs it as a subprocess)."""
    import contextlib
    import io
    import os

    from graphprune import cli

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["-q", *map(str, args)])
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["graphprune", *map(str, args)], rc, out.getvalue(), err.getvalue())


def T(name, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def conv_params(rng, cout, cin, k=3, zero=(), const_bias=()):
    """Random conv weights/bias; `zero` output channels get zero filters AND zero bias,
    `const_bias` [(c, v)] get zero filters and bias v."""
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    for c in zero:
        w[c], b[c] = 0.0, 0.0
    for c, v in const_bias:
        w[c], b[c] = 0.0, v
    return w, b


def removed_channels(report: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g in report["groups"]:
        for node, idx in g.get("removed_channels", {}).items():
            if idx:
                out[node] = sorted(idx)
    return out


def outputs(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same_function(orig, pruned, shape, *, batches=(1, 4), seeds=(0, 1), atol=1e-5):
    inp = onnx.load(str(orig), load_external_data=False).graph.input[0].name
    for b in batches:
        for s in seeds:
            x = np.random.default_rng(100 + s).standard_normal((b, *shape[1:])).astype(np.float32)
            for a, c in zip(outputs(orig, {inp: x}), outputs(pruned, {inp: x})):
                assert a.shape == c.shape
                assert np.array_equal(np.isnan(a), np.isnan(c)), "NaN pattern differs from the original"
                ok = ~np.isnan(a)
                diff = float(np.max(np.abs(a[ok] - c[ok]), initial=0.0))
                assert diff <= atol, f"pruned output differs from the ORIGINAL by {diff:.3g}"


def lossless(model_or_path, tmp_path: Path, tag: str = "m"):
    """Run `prune --lossless` (+ `verify`); return (report, original path, pruned path)."""
    if isinstance(model_or_path, onnx.ModelProto):
        src = tmp_path / f"{tag}.onnx"
        onnx.save(model_or_path, str(src))
    else:
        src = Path(model_or_path)
    out, rep = tmp_path / f"{tag}_pruned.onnx", tmp_path / f"{tag}_report.json"
    r = gp("prune", src, "-o", out, "--lossless", "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["criterion"] == "lossless" and report["budget"]["kind"] == "lossless"
    assert report["budget_met"] is True
    v = gp("verify", src, out, "--report", rep)
    assert v.returncode == 0, v.stdout + v.stderr
    assert report["totals"]["channels_removed"] == sum(len(g["removed"]) for g in report["groups"])
    return report, src, out


X_SHAPE = (1, 4, 8, 8)


def conv(name, x, w, b, y, **kw):
    return helper.make_node("Conv", [x, w, b], [y], name=name, pads=[1, 1, 1, 1], **kw)


def chain(rng, mid_nodes, mid_inits, w1, b1, *, w2=None, opset=17, mid_out="n"):
    """x -> c1 (w1, b1) -> mid_nodes (h -> mid_out) -> c2 -> y."""
    if w2 is None:
        w2 = rng.standard_normal((4, w1.shape[0], 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    nodes = [conv("c1", "x", "w1", "b1", "h"), *mid_nodes, conv("c2", mid_out, "w2", "b2", "y")]
    return make_model(nodes, [("x", ["N", 4, 8, 8])], [("y", ["N", 4, 8, 8])],
                      [T("w1", w1), T("b1", b1), T("w2", w2), T("b2", b2), *mid_inits], opset=opset)


# --------------------------------------------------------------------------- crafted graphs
def test_batchnorm_shift_decides(tmp_path):
    """Zero conv channel then BN: removed iff BN maps 0 -> 0 (or ReLU clamps the shift to 0)."""
    rng = np.random.default_rng(0)
    # 1: BN maps 0->0 (mean 0, beta 0)     -> removed
    # 5: BN shift +0.3                      -> constant 0.3 after ReLU: NOT removed
    # 7: BN shift -0.4 * scale / std < 0     -> ReLU makes it exactly 0: removed
    # 6: zero filter, bias 0.7               -> constant, NOT removed
    # 3: live producer, consumer weights 0  -> NOT removed (only zero producers count)
    w1, b1 = conv_params(rng, 8, 4, zero=(1, 5, 7), const_bias=[(6, 0.7)])
    scale = rng.uniform(0.5, 1.5, 8)
    beta = rng.normal(0, 0.3, 8)
    mean = rng.normal(0, 0.3, 8)
    var = rng.uniform(0.5, 2.0, 8)
    mean[1], beta[1] = 0.0, 0.0
    mean[5], beta[5] = 0.0, 0.3
    mean[7], beta[7] = 0.4, 0.0
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    w2[:, 3] = 0.0
    mid = [helper.make_node("BatchNormalization", ["h", "sc", "bb", "mean", "var"], ["bn"], name="bn"),
           helper.make_node("Relu", ["bn"], ["n"], name="relu")]
    m = chain(rng, mid, [T("sc", scale), T("bb", beta), T("mean", mean), T("var", var)], w1, b1, w2=w2)
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"c1": [1, 7]}
    assert_same_function(src, out, X_SHAPE)
    w1p = next(i for i in onnx.load(str(out)).graph.initializer if i.name == "w1")
    assert list(w1p.dims) == [6, 4, 3, 3]


def test_zero_channel_into_residual_add(tmp_path):
    """Zero in one Add operand but live in the other: kept. Zero in both operands: removed."""
    rng = np.random.default_rng(1)
    wa, ba = conv_params(rng, 8, 4, zero=(2, 4))
    ws, bs = conv_params(rng, 8, 4, zero=(4,))
    wo, bo = conv_params(rng, 4, 8)
    nodes = [conv("ca", "x", "wa", "ba", "a"), helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             conv("cs", "x", "ws", "bs", "s"), helper.make_node("Add", ["ar", "s"], ["sum"], name="add"),
             helper.make_node("Relu", ["sum"], ["sr"], name="r2"), conv("co", "sr", "wo", "bo", "y")]
    m = make_model(nodes, [("x", ["N", 4, 8, 8])], [("y", ["N", 4, 8, 8])],
                   [T("wa", wa), T("ba", ba), T("ws", ws), T("bs", bs), T("wo", wo), T("bo", bo)])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"ca": [4], "cs": [4]}
    assert report["totals"]["channels_removed"] == 1
    assert_same_function(src, out, X_SHAPE)


def test_zero_channels_into_pool_flatten_gemm(tmp_path):
    rng = np.random.default_rng(2)
    w1, b1 = conv_params(rng, 8, 4, zero=(0, 3))
    wg, bg = rng.standard_normal((5, 8)), rng.standard_normal(5)
    nodes = [conv("c1", "x", "w1", "b1", "h"), helper.make_node("GlobalAveragePool", ["h"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="fl"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    m = make_model(nodes, [("x", ["N", 4, 8, 8])], [("y", ["N", 5])], [T("w1", w1), T("b1", b1), T("wg", wg), T("bg", bg)])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"c1": [0, 3]}
    assert_same_function(src, out, X_SHAPE)


ZERO_CH = (3, 6)
KEEP_CASES = {  # op between two convs for which a zero channel must NOT be removed (f(0) != 0 or coupling)
    "sigmoid": ("Sigmoid", [], {}, []),
    "exp": ("Exp", [], {}, []),
    "hardsigmoid": ("HardSigmoid", [], {}, []),
    "softplus": ("Softplus", [], {}, []),
    "add_const": ("Add", ["c"], {}, [T("c", np.ones((1, 8, 1, 1)))]),
    "softmax_channels": ("Softmax", [], {"axis": 1}, []),
    "softmax_width": ("Softmax", [], {"axis": -1}, []),
    "logsoftmax_channels": ("LogSoftmax", [], {"axis": 1}, []),
    "lrn": ("LRN", [], {"size": 3}, []),
    "pad_value_1": ("Pad", ["pads", "pv"], {"mode": "constant"},
                    [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"), T("pv", 1.0)]),
    "pow_0": ("Pow", ["e"], {}, [T("e", 0.0)]),
    "reciprocal": ("Reciprocal", [], {}, []),
}
REMOVE_CASES = {  # f(0) == 0 per channel: the zero channels ARE removed
    "relu": ("Relu", [], {}, []),
    "leaky": ("LeakyRelu", [], {}, []),
    "elu": ("Elu", [], {}, []),
    "gelu": ("Gelu", [], {}, []),
    "tanh": ("Tanh", [], {}, []),
    "hardswish": ("HardSwish", [], {}, []),
    "neg": ("Neg", [], {}, []),
    "pow_2": ("Pow", ["e"], {}, [T("e", 2.0)]),
    "pad_zero": ("Pad", ["pads"], {"mode": "constant"},
                 [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]),
    "mul_const": ("Mul", ["c"], {}, [T("c", np.full((1, 8, 1, 1), 2.5))]),
    "instnorm_bias0": ("InstanceNormalization", ["isc", "ib"], {},
                       [T("isc", np.ones(8)), T("ib", np.r_[np.zeros(7), 1.0])]),
}


def _op_model(rng, op, extra_inputs, attrs, inits):
    w1, b1 = conv_params(rng, 8, 4, zero=ZERO_CH)
    mid = [helper.make_node(op, ["h", *extra_inputs], ["n"], name="op", **attrs)]
    m = chain(rng, mid, inits, w1, b1, opset=20)
    if op == "Pad":  # spatial size grows by 2: the second conv has no padding then
        m.graph.node[-1].ClearField("attribute")
        m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 8
    return m


@pytest.mark.parametrize("case", sorted(KEEP_CASES))
def test_zero_channel_not_provably_zero_after_op(tmp_path, case):
    rng = np.random.default_rng(3)
    m = _op_model(rng, *KEEP_CASES[case])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {}
    assert report["totals"]["channels_removed"] == 0
    assert_same_function(src, out, X_SHAPE)


@pytest.mark.parametrize("case", sorted(REMOVE_CASES))
def test_zero_channel_stays_zero_after_op(tmp_path, case):
    rng = np.random.default_rng(4)
    m = _op_model(rng, *REMOVE_CASES[case])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"c1": list(ZERO_CH)}
    assert_same_function(src, out, X_SHAPE)


def test_thresholded_relu_unknown_channels_are_not_zero(tmp_path):
    rng = np.random.default_rng(5)
    m = _op_model(rng, "ThresholdedRelu", [], {"alpha": 0.1}, [])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"c1": [3, 6]}
    assert_same_function(src, out, X_SHAPE)


def test_zero_times_inf_is_not_zero(tmp_path):
    rng = np.random.default_rng(6)
    c = np.ones((1, 8, 1, 1), np.float32)
    c[0, 3] = np.inf
    m = _op_model(rng, "Mul", ["c"], {}, [T("c", c)])
    report, src, out = lossless(m, tmp_path)
    assert removed_channels(report) == {"c1": [6]}
    assert_same_function(src, out, X_SHAPE)


def test_nothing_zero_writes_equivalent_model(tmp_path):
    rng = np.random.default_rng(7)
    w1, b1 = conv_params(rng, 8, 4)
    m = chain(rng, [helper.make_node("Relu", ["h"], ["n"], name="relu")], [], w1, b1)
    report, src, out = lossless(m, tmp_path)
    assert report["totals"]["channels_removed"] == 0
    assert report["totals"]["macs_after"] == report["totals"]["macs_before"]
    assert_same_function(src, out, X_SHAPE)


# --------------------------------------------------------------------------- zoo models
@pytest.fixture(scope="module")
def torch_zoo():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    from converters.torch_to_onnx import export_module
    from samples import zoo

    return torch, zoo, export_module


def _node_with(report, *needles):
    names = [s["node"] for g in report["groups"] for s in g["sources"]]
    hits = [n for n in names if all(k in n for k in needles)]
    assert len(hits) == 1, (needles, names)
    return hits[0]


def test_resnet_basic_folded_zero_channels(tmp_path, torch_zoo):
    torch, zoo, export_module = torch_zoo
    model = zoo.make("resnet_basic")
    with torch.no_grad():
        bn1 = model.layers[0].conv1[1]  # private group: conv1 -> relu -> conv2
        bn1.weight[[2, 9]] = 0.0
        bn1.bias[[2, 9]] = 0.0
        bn2 = model.layers[0].conv2[1]  # feeds the residual Add with a live identity shortcut
        bn2.weight[5] = 0.0
        bn2.bias[5] = 0.0
    src = export_module(model, zoo.example_input("resnet_basic"), tmp_path / "rb.onnx")
    report, src, out = lossless(src, tmp_path, "rb")
    conv1 = _node_with(report, "layers.0/conv1", "Conv")
    assert removed_channels(report) == {conv1: [2, 9]}
    assert_same_function(src, out, zoo.input_shape("resnet_basic"))


def test_resnet_basic_unfolded_batchnorm(tmp_path, torch_zoo):
    torch, zoo, export_module = torch_zoo
    model = zoo.make("resnet_basic")
    with torch.no_grad():
        conv, bn = model.layers[0].conv1[0], model.layers[0].conv1[1]
        conv.weight[[2, 4, 7, 9]] = 0.0
        bn.running_mean[[2, 4, 7, 9]] = 0.0
        bn.bias[[2, 9]] = 0.0   # BN maps 0 -> 0: removed
        bn.bias[4] = 0.5        # BN shift +0.5, ReLU keeps it: not removed
        bn.bias[7] = -0.5       # BN shift -0.5, ReLU clamps to 0: removed
    src = export_module(model, zoo.example_input("resnet_basic"), tmp_path / "rbu.onnx", fold_constants=False)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    report, src, out = lossless(src, tmp_path, "rbu")
    conv1 = _node_with(report, "layers.0/conv1", "Conv")
    assert removed_channels(report) == {conv1: [2, 7, 9]}
    assert_same_function(src, out, zoo.input_shape("resnet_basic"))


def test_mobilenet_v2_zero_channels_through_depthwise(tmp_path, torch_zoo):
    torch, zoo, export_module = torch_zoo
    model = zoo.make("mobilenet_v2")
    block = model.features[2].block  # expand 1x1 (16->96) -> depthwise 3x3 -> project
    with torch.no_grad():
        ex, dw = block[0][1], block[1][1]
        for c in (3, 10):       # zero after expand AND after depthwise: removed
            ex.weight[c] = ex.bias[c] = 0.0
            dw.weight[c] = dw.bias[c] = 0.0
        ex.weight[20] = ex.bias[20] = 0.0   # depthwise BN adds +0.3: not removed
        dw.running_mean[20], dw.bias[20] = 0.0, 0.3
        # expand output live, but the depthwise output is identically 0 (zero filter, zero bias), and the
        # depthwise is the only consumer: the unit is unused downstream, so removing it is exact: removed
        dw.weight[30] = dw.bias[30] = 0.0
    src = export_module(model, zoo.example_input("mobilenet_v2"), tmp_path / "mb.onnx")
    report, src, out = lossless(src, tmp_path, "mb")
    rem = removed_channels(report)
    expand = _node_with(report, "features.2/block/block.0/", "Conv")
    assert rem == {expand: [3, 10, 30]}
    assert report["totals"]["channels_removed"] == 3
    assert_same_function(src, out, zoo.input_shape("mobilenet_v2"))
