"""An independent MAC count: from the shapes onnxruntime produces at a given input size.

It shares nothing with graphprune.cost (no trace, no shape inference): every Conv, ConvTranspose,
Gemm, MatMul and Einsum output becomes a graph output, the model runs once, and MACs are read off
the produced shapes and the weights, at batch 1: every axis of a produced shape counts (tokens
flattened into the rows of a Gemm, heads or windows folded into the batch axis)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


def _inputs(model: onnx.ModelProto, sizes: dict) -> dict:
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        feeds[vi.name] = rng.standard_normal(sizes[vi.name]).astype(np.float32)
    return feeds


def count_macs(path_or_model, sizes: dict) -> float:
    """MACs at ``sizes`` ({input: dims}, batch 1) counted from onnxruntime's produced shapes."""
    assert all(s[0] == 1 for s in sizes.values()), "count at batch 1"
    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    wanted = []
    for n in model.graph.node:
        if n.op_type in _OPS:
            wanted.extend(t for t in [*n.input, n.output[0]] if t and t not in consts)
    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, sess.run(None, _inputs(model, sizes)))}

    def shape(t):
        return consts[t].shape if t in consts else shapes[t]

    total = 0.0
    for n in model.graph.node:
        if n.op_type not in _OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        out = shapes[n.output[0]]
        if n.op_type == "Conv":
            w = shape(n.input[1])
            total += np.prod(out) * np.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            w, x = shape(n.input[1]), shape(n.input[0])
            total += np.prod(x) * np.prod(w[1:])
        elif n.op_type == "Gemm":
            a = shape(n.input[0])
            k = a[0] if attrs.get("transA", 0) else a[1]
            total += np.prod(out) * k
        elif n.op_type == "MatMul":  # every axis counts (heads folded into the batch axis: B*H)
            a = shape(n.input[0])
            total += np.prod(out) * a[-1]
        else:  # Einsum: product of every letter's size once, batch letter at 1
            eq = attrs["equation"].decode() if isinstance(attrs["equation"], bytes) else attrs["equation"]
            lhs = eq.replace(" ", "").split("->")[0].split(",")
            dims: dict[str, int] = {}
            for term, t in zip(lhs, n.input):
                for letter, d in zip(term, shape(t)):
                    dims[letter] = d
            total += float(np.prod(list(dims.values())))
    return float(total)
