"""The ONNX -> PyTorch executor matches onnxruntime, is differentiable and records every layer."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters.onnx_to_torch import LAYER_OPS, OPS, TorchGraph, UnsupportedOpError
from graphprune.io import load_model
from graphprune.runtime import random_inputs, run, session
from samples.zoo import ZOO

EXPORTERS = ("torchscript", "dynamo")
RTOL = 1e-4


def rel_error(ref: np.ndarray, got) -> float:
    got = got.detach().cpu().numpy() if torch.is_tensor(got) else np.asarray(got)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    if ref.dtype == np.bool_ or np.issubdtype(ref.dtype, np.integer):
        return 0.0 if np.array_equal(ref, got) else float("inf")
    if not ref.size:
        return 0.0
    return float(np.max(np.abs(ref.astype(np.float64) - got))) / max(float(np.max(np.abs(ref))), 1e-6)


def assert_matches_ort(model: onnx.ModelProto, tg: TorchGraph, batches=(1, 3), device="cpu"):
    sess = session(model)
    for k, batch in enumerate(batches):
        feeds = random_inputs(model, batch=batch, seed=k)
        ref = run(sess, feeds)
        with torch.no_grad():
            got = tg(**{n: torch.from_numpy(v).to(device) for n, v in feeds.items()})
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert rel_error(r, g) <= RTOL, (batch, rel_error(r, g))


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in have)
    return m


# --------------------------------------------------------------------------- the zoo
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_matches_onnxruntime_and_is_differentiable(name, exporter, zoo_model):
    model = load_model(zoo_model(name, exporter))
    tg = TorchGraph(model)
    assert_matches_ort(model, tg)

    # gradients reach every trainable parameter (all weights and biases of the layers)
    layer_weights = {n.inputs[1].name for n in tg.graph.nodes if n.op in LAYER_OPS}
    assert layer_weights and layer_weights <= set(tg.param_names())
    feeds = random_inputs(model, batch=3, seed=7)
    tg.zero_grad()
    tg(**feeds)[0].square().mean().backward()
    grads = [tg.param(n).grad for n in tg.param_names()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
    assert all(tg.param(n).is_leaf and tg.param(n).dtype == torch.float32 for n in tg.param_names())

    # the recorder sees every layer, with the activations onnxruntime computes
    seen: dict[str, tuple] = {}

    def recorder(node, x, y):
        seen[node.name] = (node, x.detach().numpy(), y.detach().numpy())

    tg.recorder = recorder
    with torch.no_grad():
        tg(**feeds)
    layers = [n for n in tg.graph.nodes if n.op in LAYER_OPS]
    assert {n.name for n in layers} == set(seen)
    assert {"Conv", "Gemm"} <= {n.op for n in layers}
    names = [t.name for n in layers for t in (n.inputs[0], n.outputs[0])]
    probe = _with_outputs(model, names)
    values = dict(zip([o.name for o in probe.graph.output], run(probe, feeds)))
    for node, x, y in seen.values():
        for t, got in ((node.inputs[0], x), (node.outputs[0], y)):
            if t.shape is not None:  # static dims from shape inference; the symbolic batch is 3
                assert len(t.shape) == got.ndim
                assert all(not isinstance(d, int) or d == g for d, g in zip(t.shape, got.shape)), (t.shape, got.shape)
            assert rel_error(values[t.name], got) <= RTOL, node.name


def test_digits_resnet_matches_onnxruntime():
    model = load_model("samples/digits_resnet.onnx")
    assert_matches_ort(model, TorchGraph(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(zoo_model):
    model = load_model(zoo_model("mixed_ops", "dynamo"))
    tg = TorchGraph(model, device="cuda")
    assert all(p.is_cuda for p in tg.parameters())
    assert_matches_ort(model, tg, device="cuda")
    feeds = {n: torch.from_numpy(v).cuda() for n, v in random_inputs(model, batch=3).items()}
    tg(**feeds)[0].square().mean().backward()
    assert all(tg.param(n).grad is not None for n in tg.param_names())


# --------------------------------------------------------------------------- API details
def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: (name, shape) float32 or (name, shape, elem_type)."""
    def vi(spec):
        name, shape, *rest = spec
        return helper.make_tensor_value_info(name, rest[0] if rest else TensorProto.FLOAT, shape)

    outs = [vi(s) if s[1] is not None else helper.make_empty_tensor_value_info(s[0]) for s in outputs]
    graph = helper.make_graph(nodes, "t", [vi(s) for s in inputs], outs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def arr(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def floats(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _mlp():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    inits = [arr("W", (4, 6)), arr("b", (6,), 1), arr("W2", (3, 6), 2), arr("b2", (3,), 3)]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3])], inits)


def test_default_trainables_params_and_set_weights():
    model = _mlp()
    tg = TorchGraph(model)
    assert tg.input_names == ["x"] and tg.output_names == ["y"]
    assert tg.param_names() == ["W", "W2", "b2"]  # b is an Add operand, not a layer input
    assert isinstance(tg.param("W"), torch.nn.Parameter) and tg.param("W").requires_grad
    with pytest.raises(KeyError):
        tg.param("b")
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    positional, named = tg(torch.from_numpy(x))[0], tg(x=x)[0]
    assert torch.equal(positional, named)

    # gradients are those of the same function written in torch
    named.square().mean().backward()
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).requires_grad_() for i in model.graph.initializer}
    y = torch.relu(torch.from_numpy(x) @ w["W"] + w["b"]) @ w["W2"].t() + w["b2"]
    y.square().mean().backward()
    for name in tg.param_names():
        torch.testing.assert_close(tg.param(name).grad, w[name].grad)

    new = {"W2": np.full((3, 6), 0.5, np.float32), "b": np.arange(6, dtype=np.float32)}
    tg.set_weights(new)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for init in edited.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    assert rel_error(run(edited, {"x": x})[0], tg(x)[0]) <= RTOL
    assert tg.param("W2").requires_grad and tg.param("W2").is_leaf
    with pytest.raises(ValueError):
        tg.set_weights({"W": np.zeros((2, 2), np.float32)})


def test_explicit_trainables_and_graph_input():
    model = _mlp()
    tg = TorchGraph(gs.import_onnx(model), trainable=["b"])
    assert tg.param_names() == ["b"]
    tg(x=np.ones((2, 4), np.float32))[0].sum().backward()
    assert tg.param("b").grad is not None and tg.param("b").grad.abs().sum() > 0
    with pytest.raises(KeyError):
        TorchGraph(model, trainable=["nope"])


def test_unsorted_graph_and_unused_outputs():
    model = make_model([N("Relu", ["h"], ["y"]), N("Split", ["x"], ["h", "unused"], axis=1, num_outputs=2),
                        N("Dropout", ["y"], ["z", "mask"])],
                       [("x", ["N", 4])], [("y", ["N", 2]), ("z", ["N", 2])], opset=18)
    graph = gs.import_onnx(model)
    assert [n.op for n in graph.nodes] == ["Relu", "Split", "Dropout"]
    tg = TorchGraph(graph)
    assert [n.op for n in graph.nodes] == ["Relu", "Split", "Dropout"]  # the caller's graph is left alone
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    y, z = tg(x)
    assert torch.equal(y, torch.relu(torch.from_numpy(x[:, :2]))) and torch.equal(y, z)


@pytest.mark.parametrize("case", ["NonMaxSuppression", "custom"])
def test_unsupported_op_raises_at_construction(case):
    if case == "NonMaxSuppression":
        node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")
        model = make_model([node], [("boxes", [1, 5, 4]), ("scores", [1, 1, 5])], [("sel", None)])
    else:
        node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
        graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.example", 1)])
    op = "NonMaxSuppression" if case == "NonMaxSuppression" else "FancyOp"
    with pytest.raises(UnsupportedOpError, match=f"cannot execute ONNX op '{op}' \\(node '"):
        TorchGraph(model)


def test_op_table_is_explicit():
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Resize", "Slice", "Split", "Softmax", "ReduceL2",
               "Einsum", "TopK", "ArgMax", "Range", "ConstantOfShape"):
        assert callable(OPS[op])


# --------------------------------------------------------------------------- single ops vs onnxruntime
def N(op, ins, outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), **attrs)


X4 = [("x", ["N", 3, 7, 9])]
CASES = {
    "resize_linear_half_pixel": ([N("Resize", ["x", "", "s"], mode="linear")], X4, [floats("s", [1, 1, 2, 1.5])]),
    "resize_linear_align_corners_sizes": (
        [N("Resize", ["x", "", "", "sz"], mode="linear", coordinate_transformation_mode="align_corners")],
        [("x", [2, 3, 7, 9])], [ints("sz", [2, 3, 11, 4])]),
    "resize_linear_pytorch_half_pixel": (
        [N("Resize", ["x", "", "s"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")],
        X4, [floats("s", [1, 1, 0.5, 3])]),
    "resize_linear_asymmetric": (
        [N("Resize", ["x", "", "s"], mode="linear", coordinate_transformation_mode="asymmetric")],
        X4, [floats("s", [1, 1, 1.7, 2])]),
    "resize_nearest_half_pixel": (
        [N("Resize", ["x", "", "s"], mode="nearest", coordinate_transformation_mode="half_pixel")],
        X4, [floats("s", [1, 1, 3, 0.6])]),
    "resize_nearest_asymmetric_floor_sizes": (
        [N("Resize", ["x", "", "", "sz"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], [("x", [2, 3, 7, 9])], [ints("sz", [2, 3, 16, 5])]),
    "conv_transpose_output_padding": (
        [N("ConvTranspose", ["x", "w", "b"], strides=[2, 3], output_padding=[1, 2], pads=[1, 0, 0, 1])],
        X4, [arr("w", (3, 4, 3, 3)), arr("b", (4,), 1)]),
    "conv_transpose_groups_dilation": (
        [N("ConvTranspose", ["x", "w"], strides=[2, 2], dilations=[2, 1], group=3, pads=[1, 1, 1, 1],
           output_padding=[1, 1])], X4, [arr("w", (3, 2, 3, 2))]),
    "conv_transpose_output_shape": (
        [N("ConvTranspose", ["x", "w"], strides=[2, 2], output_shape=[15, 18])], X4, [arr("w", (3, 2, 3, 3))]),
    "conv_transpose_auto_pad_same": (
        [N("ConvTranspose", ["x", "w"], ["a"], strides=[2, 3], auto_pad="SAME_UPPER"),
         N("ConvTranspose", ["x", "w"], ["b"], strides=[2, 3], auto_pad="SAME_LOWER")], X4, [arr("w", (3, 2, 4, 2))]),
    "conv_auto_pad_same_upper": (
        [N("Conv", ["x", "w", "b"], strides=[2, 2], auto_pad="SAME_UPPER")], X4, [arr("w", (5, 3, 4, 3)),
                                                                                  arr("b", (5,), 1)]),
    "conv_auto_pad_same_lower": (
        [N("Conv", ["x", "w"], strides=[2, 1], auto_pad="SAME_LOWER")], X4, [arr("w", (4, 3, 2, 2))]),
    "conv_asymmetric_pads_grouped": (
        [N("Conv", ["x", "w"], pads=[0, 1, 2, 0], group=3)], X4, [arr("w", (6, 1, 3, 3))]),
    "conv1d": ([N("Conv", ["x", "w"], pads=[1, 1], strides=[2])], [("x", ["N", 3, 10])], [arr("w", (2, 3, 3))]),
    "slice_negative_steps": (
        [N("Slice", ["x", "st", "en", "ax", "sp"])], X4,
        [ints("st", [-1, 5, 100]), ints("en", [-(2**63), 0, -100]), ints("ax", [1, 2, 3]), ints("sp", [-1, -2, -3])]),
    "slice_huge_ends": (
        [N("Slice", ["x", "st", "en", "ax"])], X4, [ints("st", [1, -4]), ints("en", [2**63 - 1, -1]),
                                                    ints("ax", [-1, 2])]),
    "split_num_outputs": (
        [N("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3)], X4, [], 18),
    "split_sizes_input": ([N("Split", ["x", "sp"], ["a", "b"], axis=2)], X4, [ints("sp", [2, 5])]),
    "where_expand_tile": (
        [N("Greater", ["x", "zero"], ["m"]), N("Expand", ["e", "shp"], ["big"]), N("Where", ["m", "x", "big"], ["w"]),
         N("Tile", ["w", "reps"])], X4,
        [floats("zero", [0.0]), arr("e", (3, 1, 9)), ints("shp", [1, 1, 7, 1]), ints("reps", [1, 2, 1, 2])]),
    "softmax_opset11": ([N("Softmax", ["x"], axis=1), N("LogSoftmax", ["x"], ["z"], axis=2)], X4, [], 11),
    "softmax_opset13": ([N("Softmax", ["x"], axis=1), N("LogSoftmax", ["x"], ["z"], axis=2)], X4, [], 13),
    "pad_reflect_edge_constant": (
        [N("Pad", ["x", "p"], ["a"], mode="reflect"), N("Pad", ["a", "p"], ["b"], mode="edge"),
         N("Pad", ["b", "p2", "cv"], mode="constant")], X4,
        [ints("p", [0, 0, 1, 2, 0, 0, 2, 1]), ints("p2", [0, 1, -1, 0, 0, 0, 1, 2]), floats("cv", 1.5)]),
    "pools": (
        [N("MaxPool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
         N("AveragePool", ["x"], ["b"], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1]),
         N("AveragePool", ["x"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
         N("MaxPool", ["x"], ["d"], kernel_shape=[2, 2], dilations=[2, 2], pads=[0, 0, 1, 1]),
         N("GlobalMaxPool", ["x"], ["e"])], X4, []),
    "reductions_opset18": (
        [N("ReduceMean", ["x", "a1"], ["a"]), N("ReduceSum", ["x", "a2"], ["b"], keepdims=0),
         N("ReduceMax", ["x"], ["c"], keepdims=0), N("ReduceL2", ["x", "a1"], ["d"]),
         N("ReduceProd", ["x", "a2"], ["e"]), N("ReduceMin", ["x", "a1"], ["f"], keepdims=0)], X4,
        [ints("a1", [-1, 2]), ints("a2", [1])], 18),
    "activations": (
        [N("Clip", ["x", "", "hi"], ["a"]), N("HardSigmoid", ["a"], ["b"], alpha=0.3, beta=0.4),
         N("Elu", ["b"], ["c"], alpha=0.7), N("Selu", ["c"], ["d"]), N("Celu", ["x"], ["e"], alpha=0.5),
         N("Softplus", ["e"], ["f"]), N("Softsign", ["f"], ["g"]), N("Gelu", ["g"], ["h"], approximate="tanh"),
         N("Mish", ["h"], ["i"]), N("Erf", ["i"], ["j"]), N("PRelu", ["x", "slope"], ["k"]),
         N("Sum", ["j", "k", "x"], ["l"]), N("Mean", ["l", "x"], ["m"]), N("Max", ["m", "x"], ["n"]),
         N("Min", ["n", "a"], ["o"]), N("Pow", ["o", "two"]), N("LayerNormalization", ["x", "s9"], ["ln"], axis=-2)],
        X4, [floats("hi", 0.5), arr("slope", (3, 1, 1)), floats("two", 2.0), arr("s9", (7, 1), 3)], 20),
    "integer_and_index_ops": (
        [N("ArgMax", ["x"], ["a"], axis=2), N("ArgMin", ["x"], ["b"], axis=-1, keepdims=0, select_last_index=1),
         N("TopK", ["x", "k"], ["v", "i"], axis=3), N("Cast", ["x"], ["xi"], to=TensorProto.INT32),
         N("Div", ["xi", "three"], ["d"]), N("Mod", ["xi", "three"], ["m"]), N("Round", ["x"], ["r"]),
         N("Range", ["zero", "five", "two"], ["rg"]), N("Cast", ["rg"], ["rgf"], to=TensorProto.FLOAT),
         N("Mul", ["r", "rgf"], ["rm"]), N("GatherElements", ["x", "gi"], ["ge"], axis=3),
         N("Equal", ["d", "m"], ["eq"]), N("Not", ["eq"], ["ne"]), N("Less", ["x", "r"], ["lt"]),
         N("And", ["ne", "lt"], ["an"]), N("Or", ["an", "eq"], ["o"]), N("Where", ["o", "ge", "rm"], ["w"])],
        [("x", [2, 3, 7, 9])],
        [ints("k", [4]), numpy_helper.from_array(np.array(3, np.int32), "three"), floats("zero", 0.0),
         floats("five", 9.0), floats("two", 1.0), ints("gi", np.random.default_rng(0).integers(-9, 9, (2, 3, 7, 9)))]),
    "norms_and_upsample": (
        [N("InstanceNormalization", ["x", "s3", "b3"], ["a"], epsilon=1e-3),
         N("BatchNormalization", ["a", "s3", "b3", "m3", "v3"], ["b"]),
         N("Upsample", ["b", "us"], mode="nearest")],
        X4, [arr("s3", (3,)), arr("b3", (3,), 1), arr("m3", (3,), 2), floats("v3", [0.5, 1, 2]),
             floats("us", [1, 1, 2, 3])], 9),
    "resize_nearest_modes": (
        [N("Resize", ["x", "", "s"], ["a"], mode="nearest", nearest_mode="round_prefer_ceil"),
         N("Resize", ["x", "", "s"], ["b"], mode="nearest", nearest_mode="ceil",
           coordinate_transformation_mode="align_corners"),
         N("Resize", ["x", "", "s"], ["c"], mode="nearest", coordinate_transformation_mode="pytorch_half_pixel")],
        X4, [floats("s", [1, 1, 2.5, 0.5])]),
    "dynamic_shape_arithmetic": (
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "i0"], ["n"]), N("Unsqueeze", ["n", "z"], ["nu"]),
         N("Concat", ["nu", "m1"], ["shp"], axis=0), N("Reshape", ["x", "shp"], ["r"]),
         N("Shape", ["r"], ["s2"], start=-1), N("ConstantOfShape", ["s2"], ["ones"],
                                               value=numpy_helper.from_array(np.ones(1, np.float32))),
         N("Mul", ["r", "ones"], ["rm"]), N("LayerNormalization", ["rm", "g", "bb"], ["ln"], axis=-1),
         N("Flatten", ["ln"], ["f"], axis=1), N("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
         N("Slice", ["t", "zz", "one", "three"], ["t2"]), N("Squeeze", ["t2", "three"], ["sq"]),
         N("Einsum", ["sq", "sq"], ["es"], equation="...ij,...ij->...i"), N("ReduceSum", ["es"], ["esum"], keepdims=0),
         N("Add", ["f", "esum"])], X4,
        [ints("i0", 0), ints("z", [0]), ints("m1", [-1]), arr("g", (189,)), arr("bb", (189,), 1), ints("zz", [0]),
         ints("one", [1]), ints("three", [3])]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_ops_match_onnxruntime(case):
    nodes, inputs, inits, *rest = CASES[case]
    opset = rest[0] if rest else 17
    consumed = {i for n in nodes for i in n.input}
    outs = [(o, None) for n in nodes for o in n.output if o not in consumed]
    model = make_model(nodes, inputs, outs, inits, opset)
    tg = TorchGraph(model)
    batches = (1, 3) if isinstance(inputs[0][1][0], str) else (inputs[0][1][0],)
    assert_matches_ort(model, tg, batches=batches)
    # everything float is differentiable with respect to the input
    x = torch.from_numpy(random_inputs(model, batch=2 if len(batches) > 1 else batches[0])["x"]).requires_grad_()
    out = [t for t in tg(x) if t.is_floating_point()]
    sum(t.sum() for t in out).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_share_weights_reads_the_graph_arrays_without_copying():
    from graphprune.tracer import detach_weights, to_graph

    model = _mlp()
    graph = to_graph(model)
    detach_weights(model, graph)
    arrays = {t.name: t.values for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    shared, copied = TorchGraph(graph, share_weights=True), TorchGraph(graph)
    assert shared.shares_weights and not copied.shares_weights
    for name in ("W", "W2", "b2"):
        assert np.shares_memory(shared.param(name).detach().numpy(), arrays[name])
        assert not np.shares_memory(copied.param(name).detach().numpy(), arrays[name])
    x = np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)
    out = shared(x=x)[0]
    out.square().sum().backward()  # gradients never touch the shared values
    torch.testing.assert_close(out, copied(x=x)[0])
    np.testing.assert_array_equal(arrays["W"], numpy_helper.to_array(model.graph.initializer[0]))
    with pytest.raises(RuntimeError, match="shares its weights"):
        shared.set_weights({"W2": np.zeros((3, 6), np.float32)})
