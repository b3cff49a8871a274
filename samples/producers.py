"""Small deterministic ONNX graphs written in the idioms of real third-party exporters.

Each builder returns ``(model, info)`` with ``info = {"input", "shape", "second_shape", "producer",
"stride"}``: ``shape`` is the size the real models are run at (batch 1), ``second_shape`` another
valid size (``None`` when the graph is static) and ``stride`` the factor H and W must be multiples of.
All weights come from ``np.random.default_rng(seed)``; BatchNorm statistics are non-trivial.

Builders (none copies code or weights from the exporters; the structure was read off their mappers
and off real exported files):

* :func:`paddle_det`   paddle2onnx, PP-OCR DB text detector (MobileNetV3-ish + DBFPN + DB head)
* :func:`paddle_rec`   paddle2onnx, PP-OCR CRNN-like recogniser (N x T x classes softmax)
* :func:`caffe2_zoo`   old ONNX model-zoo classifier (opset 7-9, IR 3/4, Sum/LRN/Dropout/Gemm)
* :func:`yolov8`       ultralytics YOLOv8 (PyTorch module exported by torch.onnx, TorchScript route)
* :func:`tf2onnx_cnn`  tf2onnx, Keras CNN in NHWC with Transpose pairs, ReduceMean, MatMul, Einsum

``python -m samples.producers`` builds each, checks it and runs it in onnxruntime at both shapes.
"""
from __future__ import annotations

import collections
import io
import math
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# --------------------------------------------------------------------------------------- helpers
_IR_FOR_OPSET = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8}


class _Graph:
    """Minimal graph writer: nodes in order, constants as Constant nodes or initializers."""

    def __init__(self, rng: np.random.Generator, constants: str = "node"):
        self.rng = rng
        self.constants = constants  # "node" (Constant ops) or "init" (initializers)
        self.params: list[onnx.NodeProto] = []  # weight Constant nodes, emitted before the body
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: collections.Counter = collections.Counter()

    def uid(self, prefix: str, step: int = 1) -> str:
        n = self.counts[prefix]
        self.counts[prefix] += step
        return f"{prefix}{n}"

    def const(self, value, name: str, dtype=np.float32, where: str | None = None) -> str:
        """``where``: "param" (Constant node at the top), "node" (inline Constant), "init"."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        where = where or ("param" if self.constants == "node" else "init")
        if where == "init":
            self.inits.append(tensor)
        else:
            node = helper.make_node("Constant", [], [name], value=tensor)
            (self.params if where == "param" else self.nodes).append(node)
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, name: str | None = None,
           **attrs) -> str:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name or outputs[0], **attrs))
        return outputs[0]

    def model(self, inputs, outputs, opset: int, producer: str, version: str = "", name: str = "graph",
              inits_as_inputs: bool = False, ir_version: int | None = None) -> onnx.ModelProto:
        inputs = list(inputs)
        if inits_as_inputs:  # IR 3 (and old exporters on IR 4): every initializer is a graph input too
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.params + self.nodes, name, inputs, outputs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name=producer, producer_version=version)
        m.ir_version = ir_version or _IR_FOR_OPSET.get(opset, 8)
        return m


def _value_info(name: str, dims, elem=TensorProto.FLOAT):
    t = helper.make_tensor_value_info(name, elem, None)
    shape = t.type.tensor_type.shape
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)
    return t


def _conv_weight(rng, cout, cin_per_group, kh, kw, gain=1.0):
    fan_in = cin_per_group * kh * kw
    return (rng.standard_normal((cout, cin_per_group, kh, kw)) * gain / math.sqrt(fan_in)).astype(np.float32)


def _bn_params(rng, c):
    """(scale, bias, mean, var): var positive, means non-zero, scale around 1."""
    scale = rng.uniform(0.6, 1.4, c)
    bias = rng.normal(0.1, 0.2, c)
    mean = rng.normal(0.0, 0.2, c)
    var = rng.uniform(0.5, 1.5, c)
    return [a.astype(np.float32) for a in (scale, bias, mean, var)]


def fix_input_shape(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    """A copy with the first graph input's dims replaced by the static ``shape`` (as one would edit
    a dynamic export by hand); value_info is dropped and outputs are left as they were."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        d.dim_value = int(v)
    del m.graph.value_info[:]
    return m


# --------------------------------------------------------------------------------------- paddle2onnx
class _Paddle(_Graph):
    """paddle2onnx naming and helpers: parameters are Constant nodes named after Paddle's
    parameters (``conv2d_3.w_0``), emitted before the body; helper constants are inline Constant
    nodes (``p2o.helper.constant.N``); intermediate tensors are ``p2o.<Op>.<N>``."""

    def __init__(self, rng, opset):
        super().__init__(rng, "node")
        self.opset = opset

    def tmp(self, op):
        return self.uid(f"p2o.{op}.", 2)

    def hconst(self, value, dtype=np.float32):
        return self.const(value, self.uid("p2o.helper.constant."), dtype, where="node")

    def conv(self, x, cin, cout, k, s=1, groups=1, bias=False, pads=None, gain=1.0, kind=None):
        kh, kw = (k, k) if isinstance(k, int) else k
        sh, sw = (s, s) if isinstance(s, int) else s
        kind = kind or ("depthwise_conv2d" if groups == cin and groups > 1 else "conv2d")
        idx = self.uid(f"{kind}_")
        w = self.const(_conv_weight(self.rng, cout, cin // groups, kh, kw, gain), f"{idx}.w_0")
        ins = [x, w]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.1, cout), f"{idx}.b_0"))
        pads = pads if pads is not None else [kh // 2, kw // 2, kh // 2, kw // 2]
        return self.op("Conv", ins, f"{idx}.tmp_0", name=self.tmp("Conv"), dilations=[1, 1],
                       kernel_shape=[kh, kw], strides=[sh, sw], group=groups, pads=pads)

    def bn(self, x, c):
        idx = self.uid("batch_norm_")
        scale, bias, mean, var = _bn_params(self.rng, c)
        ins = [x, self.const(scale, f"{idx}.w_0"), self.const(bias, f"{idx}.b_0"),
               self.const(mean, f"{idx}.w_1"), self.const(var, f"{idx}.w_2")]
        return self.op("BatchNormalization", ins, f"{idx}.tmp_2", name=self.tmp("BatchNormalization"),
                       epsilon=1e-5, momentum=0.9)

    def clip(self, x, lo, hi, out=None):
        # opset >= 11: min/max are inputs, scalar constants
        return self.op("Clip", [x, self.hconst(lo), self.hconst(hi)], out or self.tmp("Clip"))

    def act(self, x, kind):
        if kind is None:
            return x
        if kind == "relu":
            return self.op("Relu", [x], f"{self.uid('relu_')}.tmp_0")
        if kind == "relu6":
            return self.clip(x, 0.0, 6.0, f"{self.uid('relu6_')}.tmp_0")
        if kind == "hardswish":  # HardSwishMapper below opset 14: x * clip(x + 3, 0, 6) / 6
            add = self.op("Add", [x, self.hconst(3.0)], self.tmp("Add"))
            clip = self.clip(add, 0.0, 6.0)
            mul = self.op("Mul", [x, clip], self.tmp("Mul"))
            return self.op("Div", [mul, self.hconst(6.0)], f"{self.uid('hardswish_')}.tmp_0")
        if kind == "swish":  # SwishMapper with beta: Mul(x, beta) -> Sigmoid -> Mul(x, .)
            sx = self.op("Mul", [x, self.hconst([1.0])], self.tmp("Mul"))
            sig = self.op("Sigmoid", [sx], self.tmp("Sigmoid"))
            return self.op("Mul", [x, sig], f"{self.uid('swish_')}.tmp_0")
        raise ValueError(kind)

    def conv_bn(self, x, cin, cout, k, s=1, groups=1, act=None, gain=1.0, **kw):
        return self.act(self.bn(self.conv(x, cin, cout, k, s, groups, gain=gain, **kw), cout), act)

    def se(self, x, c, r=4, pool="gap", slope=0.2, residual=False):
        """SEModule: pool -> conv(bias) -> relu -> conv(bias) -> hardsigmoid -> multiply. ``residual``
        is the RSELayer form of PP-OCRv4's neck: x + x * se(x)."""
        if pool == "gap":
            p = self.op("GlobalAveragePool", [x], self.tmp("GlobalAveragePool"))
        else:  # paddle.mean(x, axis=[2, 3], keepdim=True)
            p = self.op("ReduceMean", [x], f"{self.uid('mean_')}.tmp_0", axes=[2, 3], keepdims=1)
        h = self.act(self.conv(p, c, c // r, 1, bias=True, gain=1.4), "relu")
        h = self.conv(h, c // r, c, 1, bias=True)
        hs = self.op("HardSigmoid", [h], f"{self.uid('hardsigmoid_')}.tmp_0", alpha=slope, beta=0.5)
        y = self.op("Mul", [x, hs], self.tmp("Mul"))
        return self.op("Add", [x, y], self.tmp("Add")) if residual else y

    def slice1d(self, x, start, end):
        ins = [x, self.hconst([start], np.int64), self.hconst([end], np.int64), self.hconst([0], np.int64)]
        return self.op("Slice", ins, self.uid("p2o.helper.slice."))

    def resize_scale(self, x, scale):
        """nearest_interp_v2 with a scale attribute: empty roi, constant scales."""
        roi = self.hconst(np.zeros(0, np.float32))
        scales = self.hconst([1.0, 1.0, float(scale), float(scale)])
        return self.op("Resize", [x, roi, scales], f"{self.uid('nearest_interp_v2_')}.tmp_0", mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def resize_like(self, x, like):
        """nearest_interp_v2 with an OutSize tensor (``F.upsample(x, size=like.shape[2:])``):
        sizes = Concat(Shape(x)[0:2], Shape(like)[2:4]), roi of ones, empty scales."""
        hw = self.slice1d(self.op("Shape", [like], f"{self.uid('shape_')}.tmp_0"), 2, 4)
        nc = self.slice1d(self.op("Shape", [x], self.tmp("Shape")), 0, 2)
        sizes = self.op("Concat", [nc, hw], self.tmp("Concat"), axis=0)
        roi = self.hconst(np.ones(8, np.float32))
        scales = self.hconst(np.zeros(0, np.float32))
        return self.op("Resize", [x, roi, scales, sizes], f"{self.uid('nearest_interp_v2_')}.tmp_0",
                       mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _paddle_dims(n_dyn_start, pattern, minus_one):
    """pattern: list of ints (static) and None (dynamic); ``minus_one``: -1 for a dynamic batch."""
    dims, k = [], n_dyn_start
    for i, d in enumerate(pattern):
        if d is None:
            dims.append(-1 if minus_one and i == 0 else f"p2o.DynamicDimension.{k}")
            k += 1
        else:
            dims.append(d)
    return dims


def _inverted_residual(g, x, cin, mid, cout, k, s, act, se=None):
    """MobileNetV3 ResidualUnit: expand 1x1 (if mid != cin) -> depthwise kxk -> [SE] -> project 1x1
    (no activation); residual Add when stride 1 and cin == cout."""
    h = g.conv_bn(x, cin, mid, 1, act=act, gain=1.4) if mid != cin else x
    h = g.conv_bn(h, mid, mid, k, s, groups=mid, act=act, gain=1.4)
    if se:
        h = g.se(h, mid, pool=se)
    h = g.conv_bn(h, mid, cout, 1)
    return g.op("Add", [x, h], g.tmp("Add")) if s == 1 and cin == cout else h


def paddle_det(seed: int = 0, opset: int = 11, minus_one: bool = False):
    """PP-OCR DB text detector as paddle2onnx writes it.

    Every parameter and shape constant is a ``Constant`` node (no initializers); unfused
    BatchNormalization after each backbone and head Conv (the DBFPN convs have neither bias nor BN,
    as in Paddle); hardswish as Add(3)/Clip(0,6)/Mul/Div(6); relu6 as Clip with scalar min/max
    inputs; SE blocks with GlobalAveragePool (and one with ReduceMean) + HardSigmoid(0.2, 0.5);
    residual Adds; DBFPN with nearest ``Resize`` by scales (empty roi) and, once, by ``sizes`` from
    Shape->Slice->Concat; Concat of the four levels; DB head Conv-BN-Relu-ConvTranspose(+Add bias)-
    BN-Relu-ConvTranspose(+Add bias)-Sigmoid. Stride 32.

    ``minus_one=True`` writes ``dim_value: -1`` for the batch dim of input and output, as some
    real files do (for every dynamic dim). Only the batch: with -1 also on H and W, onnx.checker
    (1.23, full_check) fails, since shape inference carries -1 through the convs as a size and
    then disagrees with the output's declared H, W; H and W stay ``p2o.DynamicDimension.N``.
    """
    assert opset in (11, 12), opset
    g = _Paddle(np.random.default_rng(seed), opset)
    x = "x"
    # backbone (MobileNetV3-small-ish, scale ~0.35)
    h = g.conv_bn(x, 3, 8, 3, 2, act="hardswish", gain=1.4)                     # /2
    h = _inverted_residual(g, h, 8, 8, 8, 3, 1, "relu6")                         # /2, dw + residual
    c2 = _inverted_residual(g, h, 8, 24, 16, 3, 2, "relu")                       # /4
    h = _inverted_residual(g, c2, 16, 48, 24, 5, 2, "hardswish", se="gap")       # /8
    c3 = _inverted_residual(g, h, 24, 48, 24, 5, 1, "hardswish", se="mean")      # /8 residual
    h = _inverted_residual(g, c3, 24, 64, 32, 5, 2, "hardswish", se="gap")       # /16
    c4 = _inverted_residual(g, h, 32, 64, 32, 3, 1, "hardswish")                 # /16 residual
    h = _inverted_residual(g, c4, 32, 64, 48, 5, 2, "hardswish", se="gap")       # /32
    c5 = g.conv_bn(h, 48, 64, 1, act="hardswish")                                # last 1x1 conv
    # DBFPN neck, inner 32 channels, 8 per output level
    inner, outc = 32, 8
    in2, in3, in4, in5 = (g.conv(c, ci, inner, 1) for c, ci in ((c2, 16), (c3, 24), (c4, 32), (c5, 64)))
    out4 = g.op("Add", [in4, g.resize_scale(in5, 2)], g.tmp("Add"))
    out3 = g.op("Add", [in3, g.resize_like(out4, in3)], g.tmp("Add"))
    out2 = g.op("Add", [in2, g.resize_scale(out3, 2)], g.tmp("Add"))
    p5 = g.conv(in5, inner, outc, 3)
    p5 = g.se(p5, outc, r=2, residual=True)  # RSEFPN-style ins_conv on one level: x + x * se(x)
    p4, p3, p2 = g.conv(out4, inner, outc, 3), g.conv(out3, inner, outc, 3), g.conv(out2, inner, outc, 3)
    fuse = g.op("Concat", [g.resize_scale(p5, 8), g.resize_scale(p4, 4), g.resize_scale(p3, 2), p2],
                g.tmp("Concat"), axis=1)
    # DB head (binarize branch)
    h = g.conv_bn(fuse, 4 * outc, 8, 3, act="relu", gain=1.4)
    for cin, cout, last in ((8, 8, False), (8, 1, True)):
        idx = g.uid("conv2d_transpose_")
        w = g.const((g.rng.standard_normal((cin, cout, 2, 2)) * 1.4 / math.sqrt(cin)).astype(np.float32),
                    f"{idx}.w_0")
        ct = g.op("ConvTranspose", [h, w], g.tmp("ConvTranspose"), dilations=[1, 1], kernel_shape=[2, 2],
                  strides=[2, 2], group=1, pads=[0, 0, 0, 0])
        b = g.const(g.rng.normal(0, 0.1, (1, cout, 1, 1)), f"{idx}.b_0")
        h = g.op("Add", [ct, b], g.tmp("Add"))
        if not last:
            h = g.act(g.bn(h, cout), "relu")
    y = g.op("Sigmoid", [h], "sigmoid_0.tmp_0")
    inputs = [_value_info(x, _paddle_dims(0, [None, 3, None, None], minus_one))]
    outputs = [_value_info(y, _paddle_dims(3, [None, 1, None, None], minus_one))]
    m = g.model(inputs, outputs, opset, "PaddlePaddle", name="paddle_det")
    return m, {"input": x, "shape": [1, 3, 640, 640], "second_shape": [1, 3, 320, 480],
               "producer": "paddle2onnx", "stride": 32}


def paddle_rec(seed: int = 0, opset: int = 11, seq: str = "squeeze"):
    """PP-OCR CRNN-like recogniser as paddle2onnx writes it: input [dyn, 3, 48, dyn]; conv/BN/
    hardswish backbone, stride 2 on both axes in the stem and one block, then strides (2, 1) over H
    only, an AveragePool (3, 2) that brings H to 1, a (1, 3) conv with swish, then N x C x 1 x T ->
    N x T x C by ``Squeeze(axes=[2])`` + ``Transpose`` (``seq="squeeze"``) or by the flatten idiom
    Reshape(Concat(Shape[0:2], [-1])) + Transpose (``seq="reshape"``), MatMul + Add to 97 classes,
    Softmax(axis=2). W must be a multiple of 8 (info stride), H is fixed at 48.

    The real PP-OCRv4 rec file writes H as ``dim_param: "?"``; here it is 48 as the model needs."""
    assert opset in (11, 12) and seq in ("squeeze", "reshape")
    g = _Paddle(np.random.default_rng(seed), opset)
    x = "x"
    h = g.conv_bn(x, 3, 16, 3, 2, act="hardswish", gain=1.4)                      # 24 x W/2
    h = _inverted_residual(g, h, 16, 32, 16, 3, 1, "hardswish")
    h = _inverted_residual(g, h, 16, 48, 24, 3, 2, "hardswish")                   # 12 x W/4
    h = _inverted_residual(g, h, 24, 48, 32, 3, (2, 1), "hardswish", se="gap")    # 6 x W/4
    h = _inverted_residual(g, h, 32, 64, 48, 3, (2, 1), "hardswish")              # 3 x W/4
    h = g.op("AveragePool", [h], g.tmp("AveragePool"), kernel_shape=[3, 2], strides=[3, 2],
             pads=[0, 0, 0, 0], ceil_mode=0, count_include_pad=0)                 # 1 x W/8
    h = g.conv_bn(h, 48, 64, (1, 3), pads=[0, 1, 0, 1], act="swish", gain=1.4)
    if seq == "squeeze":
        s = g.op("Squeeze", [h], f"{g.uid('squeeze_')}.tmp_0", axes=[2])
    else:
        nc = g.slice1d(g.op("Shape", [h], g.tmp("Shape")), 0, 2)
        shape = g.op("Concat", [nc, g.hconst([-1], np.int64)], g.tmp("Concat"), axis=0)
        s = g.op("Reshape", [h, shape], f"{g.uid('flatten_')}.tmp_0")
    t = g.op("Transpose", [s], f"{g.uid('transpose_')}.tmp_0", perm=[0, 2, 1])
    ncls = 97
    w = g.const((g.rng.standard_normal((64, ncls)) * 4.0 / math.sqrt(64)).astype(np.float32), "linear_0.w_0")
    b = g.const(g.rng.normal(0, 0.2, ncls), "linear_0.b_0")
    logits = g.op("Add", [g.op("MatMul", [t, w], g.tmp("MatMul")), b], g.tmp("Add"))
    y = g.op("Softmax", [logits], "softmax_0.tmp_0", axis=2)
    inputs = [_value_info(x, ["p2o.DynamicDimension.0", 3, 48, "p2o.DynamicDimension.1"])]
    outputs = [_value_info(y, ["p2o.DynamicDimension.2", "p2o.DynamicDimension.3", ncls])]
    m = g.model(inputs, outputs, opset, "PaddlePaddle", name="paddle_rec")
    return m, {"input": x, "shape": [1, 3, 48, 320], "second_shape": [1, 3, 48, 160],
               "producer": "paddle2onnx", "stride": 8}


# --------------------------------------------------------------------------------------- caffe2 zoo
def caffe2_zoo(seed: int = 0, opset: int = 8):
    """An old ONNX model-zoo classifier (caffe2 / early converters), static [1, 3, 32, 32].

    IR 3 at opsets 7-8 (initializers repeated as graph inputs, as those files do; also at 9+);
    weights partly initializers, partly ``Constant`` nodes; one zero bias made by ``ConstantOfShape``
    (the op exists from opset 9 only: at 7-8 that bias is an initializer of zeros); LRN after the
    first conv; BatchNormalization with ``spatial=1`` (attribute removed at opset 9); ``Sum`` of two
    and of three inputs as residual joins; MaxPool; Dropout with a ``ratio`` attribute and a mask
    output (opset < 12; from 12 the ratio is an input); Reshape to the fixed [1, C*H*W]; Gemm
    (transB=1); Softmax."""
    assert 7 <= opset <= 13, opset
    rng = np.random.default_rng(seed)
    g = _Graph(rng, "init")
    n = iter(range(1000))

    def conv(x, cin, cout, k, name, bias="init", weight="init", gain=1.4):
        w = g.const(_conv_weight(rng, cout, cin, k, k, gain), f"{name}_w_0", where=weight)
        if bias == "zeros":  # zero bias as ConstantOfShape(shape=[cout])
            if opset >= 9:
                shp = g.const([cout], f"{name}_b_shape", np.int64, where="node")
                b = g.op("ConstantOfShape", [shp], f"{name}_b_0",
                         value=numpy_helper.from_array(np.zeros(1, np.float32), "value"))
            else:
                b = g.const(np.zeros(cout), f"{name}_b_0")
        else:
            b = g.const(rng.normal(0, 0.1, cout), f"{name}_b_0", where=bias)
        return g.op("Conv", [x, w, b], f"{name}_{next(n)}", kernel_shape=[k, k], pads=[k // 2] * 4,
                    strides=[1, 1], dilations=[1, 1], group=1)

    def bn(x, c, name):
        ins = [x] + [g.const(a, f"{name}_{s}_0") for a, s in zip(_bn_params(rng, c), ("s", "b", "rm", "riv"))]
        attrs = {"epsilon": 1e-5, "momentum": 0.9}
        if opset < 9:
            attrs["spatial"] = 1
        return g.op("BatchNormalization", ins, f"{name}_{next(n)}", **attrs)

    def relu(x):
        return g.op("Relu", [x], f"relu_{next(n)}")

    def dropout(x, name, mask=True):
        outs = [f"{name}_{next(n)}"] + ([f"_{name}_mask_{next(n)}"] if mask else [])
        if opset >= 12:
            return g.op("Dropout", [x, g.const(np.float32(0.5), f"{name}_ratio", where="node")], outs)
        return g.op("Dropout", [x], outs, ratio=0.5)

    x = "data_0"
    h = relu(conv(x, 3, 16, 3, "conv1"))
    h = g.op("LRN", [h], f"norm1_{next(n)}", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    h = g.op("MaxPool", [h], f"pool1_{next(n)}", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])  # 16
    # residual block with projection shortcut, joined by a 2-input Sum
    a = relu(bn(conv(h, 16, 32, 3, "res2a_branch2a", bias="zeros"), 32, "res2a_branch2a_bn"))
    a = bn(conv(a, 32, 32, 3, "res2a_branch2b", gain=1.0), 32, "res2a_branch2b_bn")
    s = bn(conv(h, 16, 32, 1, "res2a_branch1", gain=1.0), 32, "res2a_branch1_bn")
    h = relu(g.op("Sum", [a, s], f"res2a_{next(n)}"))
    # two parallel branches plus identity joined by a 3-input Sum; weights as Constant nodes
    a = conv(relu(conv(h, 32, 16, 1, "res3_a1", weight="node", bias="node")), 16, 32, 3, "res3_a2",
             weight="node", bias="node", gain=0.7)
    b = conv(h, 32, 32, 3, "res3_b", gain=0.7)
    h = relu(g.op("Sum", [h, a, b], f"res3_{next(n)}"))
    h = g.op("MaxPool", [h], f"pool3_{next(n)}", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 8
    h = dropout(h, "drop3")
    # Constant-1 (opsets < 9) allows float types only: an int64 shape must be an initializer there
    shape = g.const([1, 32 * 8 * 8], "OC2_DUMMY_1", np.int64, where="node" if opset >= 9 else "init")
    h = g.op("Reshape", [h, shape], f"OC2_DUMMY_0_{next(n)}")
    w = g.const(rng.standard_normal((64, 2048)) * 0.7 / math.sqrt(2048), "fc6_w_0")
    h = relu(g.op("Gemm", [h, w, g.const(rng.normal(0, 0.1, 64), "fc6_b_0")], f"fc6_{next(n)}",
                  alpha=1.0, beta=1.0, transB=1))
    h = dropout(h, "drop6", mask=False)
    w = g.const(rng.standard_normal((10, 64)) * 1.0 / math.sqrt(64), "fc7_w_0")
    h = g.op("Gemm", [h, w, g.const(rng.normal(0, 0.1, 10), "fc7_b_0")], f"fc7_{next(n)}", transB=1)
    y = g.op("Softmax", [h], "softmax_1", axis=1)
    m = g.model([_value_info(x, [1, 3, 32, 32])], [_value_info(y, [1, 10])], opset, "onnx-caffe2",
                name="caffe2_zoo", inits_as_inputs=True)
    return m, {"input": x, "shape": [1, 3, 32, 32], "second_shape": None, "producer": "caffe2", "stride": 1}


# --------------------------------------------------------------------------------------- tf2onnx
def tf2onnx_cnn(seed: int = 0, dynamic: bool = False):
    """A Keras CNN as tf2onnx (opset 13) writes it: NHWC input ``input_1:0`` [unk__0, 32, 32, 3]
    (``dynamic=True``: [unk__0, unk__1, unk__2, 3]); ``Transpose(0,3,1,2)`` before and
    ``Transpose(0,2,3,1)`` after the convs, with Relu and a residual Add left in NHWC between
    Transpose pairs (and one Relu moved inside a pair); convs with bias; TF 'SAME' padding written as
    explicit (asymmetric for the stride-2 conv) pads, or ``auto_pad=SAME_UPPER`` when H/W are
    unknown; a 1x1 dense over NHWC features as ``Einsum('bhwc,cd->bhwd')`` + Add; global average
    pooling as ReduceMean(axes=[1, 2]) then Reshape [-1, C]; Dense layers as MatMul + Add; Softmax."""
    rng = np.random.default_rng(seed)
    g = _Graph(rng, "init")
    to_nchw, to_nhwc = [0, 3, 1, 2], [0, 2, 3, 1]
    x = "input_1:0"

    def t(v, perm, name):
        return g.op("Transpose", [v], f"{name}__{g.uid('t')[1:]}", perm=perm)

    def conv(v, cin, cout, k, s, scope, pads, gain=1.4):
        w = g.const(_conv_weight(rng, cout, cin, k, k, gain), f"{scope}/Conv2D/ReadVariableOp:0")
        b = g.const(rng.normal(0, 0.1, cout), f"{scope}/BiasAdd/ReadVariableOp:0")
        attrs = {"auto_pad": "SAME_UPPER"} if dynamic else {"pads": pads}
        return g.op("Conv", [v, w, b], f"{scope}/BiasAdd:0", name=f"{scope}/BiasAdd", kernel_shape=[k, k],
                    strides=[s, s], dilations=[1, 1], **attrs)

    h = t(x, to_nchw, "model/conv2d/BiasAdd")
    h = t(conv(h, 3, 16, 3, 1, "model/conv2d", [1, 1, 1, 1]), to_nhwc, "model/conv2d/BiasAdd")
    h = g.op("Relu", [h], "model/conv2d/Relu:0")                                       # NHWC
    h = t(h, to_nchw, "model/conv2d_1/BiasAdd")
    h = t(conv(h, 16, 32, 3, 2, "model/conv2d_1", [0, 0, 1, 1]), to_nhwc, "model/conv2d_1/BiasAdd")
    y1 = g.op("Relu", [h], "model/conv2d_1/Relu:0")                                    # NHWC, /2
    h = t(y1, to_nchw, "model/conv2d_2/BiasAdd")
    h = g.op("Relu", [conv(h, 32, 32, 3, 1, "model/conv2d_2", [1, 1, 1, 1])], "model/conv2d_2/Relu:0")
    h = t(conv(h, 32, 32, 3, 1, "model/conv2d_3", [1, 1, 1, 1], gain=0.7), to_nhwc, "model/conv2d_3/BiasAdd")
    h = g.op("Add", [h, y1], "model/add/add:0")                                         # NHWC residual
    h = g.op("Relu", [h], "model/re_lu/Relu:0")
    w = g.const(rng.standard_normal((32, 48)) * 1.4 / math.sqrt(32), "model/dense/Tensordot/ReadVariableOp:0")
    h = g.op("Einsum", [h, w], "model/dense/Tensordot:0", equation="bhwc,cd->bhwd")
    h = g.op("Add", [h, g.const(rng.normal(0, 0.1, 48), "model/dense/BiasAdd/ReadVariableOp:0")],
             "model/dense/BiasAdd:0")
    h = g.op("Relu", [h], "model/dense/Relu:0")
    h = g.op("ReduceMean", [h], "model/global_average_pooling2d/Mean:0", axes=[1, 2], keepdims=1)
    h = g.op("Reshape", [h, g.const([-1, 48], "model/flatten/Const:0", np.int64)], "model/flatten/Reshape:0")
    w = g.const(rng.standard_normal((48, 64)) * 1.4 / math.sqrt(48), "model/dense_1/MatMul/ReadVariableOp:0")
    h = g.op("MatMul", [h, w], "model/dense_1/MatMul:0")
    h = g.op("Add", [h, g.const(rng.normal(0, 0.1, 64), "model/dense_1/BiasAdd/ReadVariableOp:0")],
             "model/dense_1/BiasAdd:0")
    h = g.op("Relu", [h], "model/dense_1/Relu:0")
    w = g.const(rng.standard_normal((64, 10)) * 2.0 / math.sqrt(64), "model/dense_2/MatMul/ReadVariableOp:0")
    h = g.op("MatMul", [h, w], "model/dense_2/MatMul:0")
    h = g.op("Add", [h, g.const(rng.normal(0, 0.1, 10), "model/dense_2/BiasAdd/ReadVariableOp:0")],
             "model/dense_2/BiasAdd:0")
    y = g.op("Softmax", [h], "Identity:0", name="model/dense_2/Softmax", axis=-1)
    dims = ["unk__0", "unk__1", "unk__2", 3] if dynamic else ["unk__0", 32, 32, 3]
    m = g.model([_value_info(x, dims)], [_value_info(y, ["unk__3", 10])], 13, "tf2onnx", "1.16.1 15c810",
                name="tf2onnx")
    return m, {"input": x, "shape": [1, 32, 32, 3], "second_shape": [1, 48, 64, 3] if dynamic else None,
               "producer": "tf2onnx", "stride": 2}


# --------------------------------------------------------------------------------------- ultralytics
import torch  # noqa: E402  (only the YOLOv8 builder needs it)
from torch import nn  # noqa: E402


class Conv(nn.Module):
    """ultralytics Conv: Conv2d(bias=False) + BatchNorm2d + SiLU; ``fuse()`` folds the BN into the
    conv's weight and bias (ultralytics' fuse_conv_and_bn) and drops it, as the exporter does."""

    def __init__(self, c1, c2, k=1, s=1, g=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.bn is None:
            return self.act(self.conv(x))
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self):
        bn, conv = self.bn, self.conv
        std = torch.sqrt(bn.running_var + bn.eps)
        w = conv.weight * (bn.weight / std).view(-1, 1, 1, 1)
        b = bn.bias - bn.weight * bn.running_mean / std
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          groups=conv.groups, bias=True)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        self.conv, self.bn = fused.requires_grad_(False), None


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, e=1.0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2 = Conv(c1, c_, 3), Conv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """cv1 -> chunk(2, 1) -> chain of n bottlenecks on the last chunk -> concat all parts -> cv2."""

    def __init__(self, c1, c2, n=1, shortcut=False, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over reg_max bins, then a fixed 1x1 conv with
    weights arange(reg_max)."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats, strides, offset=0.5):
    points, stride_t = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for f, s in zip(feats, strides):
        _, _, h, w = f.shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_t.append(torch.full((h * w, 1), s, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_t)


def dist2bbox(distance, anchor_points, dim=1):
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = anchor_points - lt, anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class Detect(nn.Module):
    """YOLOv8 head: per level a box branch (cv2 -> 4*reg_max) and a class branch (cv3 -> nc),
    concatenated, flattened over anchors, split, DFL + dist2bbox, times strides, sigmoid classes.
    Anchors are recomputed from the feature shapes when ``dynamic`` (ultralytics --dynamic) or when
    the shape changed, else the cached ones (constants in a static export) are used."""

    dynamic = False

    def __init__(self, nc=3, ch=(), strides=(8, 16, 32)):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), 16
        self.no = nc + self.reg_max * 4
        self.stride = torch.tensor(strides, dtype=torch.float)
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)
        self.shape = None
        self.anchors = self.strides = torch.empty(0)

    def bias_init(self):
        """ultralytics' prior: box bias 1.0, class bias from the expected object density (here a
        quarter of it, so the random network's scores are not all ~1e-4)."""
        for a, b, s in zip(self.cv2, self.cv3, self.stride.tolist()):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2) / 4  # real prior / 4

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class TinyYOLOv8(nn.Module):
    """yolov8.yaml backbone/head at a tiny width (channels 8-32, head box branch 64 by its formula)."""

    def __init__(self, nc=3, w=(8, 16, 16, 32, 32)):
        super().__init__()
        c1, c2, c3, c4, c5 = w
        self.b0, self.b1 = Conv(3, c1, 3, 2), Conv(c1, c2, 3, 2)                 # P1/2, P2/4
        self.b2 = C2f(c2, c2, 1, True)
        self.b3, self.b4 = Conv(c2, c3, 3, 2), C2f(c3, c3, 2, True)               # P3/8
        self.b5, self.b6 = Conv(c3, c4, 3, 2), C2f(c4, c4, 2, True)               # P4/16
        self.b7, self.b8 = Conv(c4, c5, 3, 2), C2f(c5, c5, 1, True)               # P5/32
        self.b9 = SPPF(c5, c5, 5)
        self.up = nn.Upsample(None, 2, "nearest")
        self.h12 = C2f(c5 + c4, c4, 1)
        self.h15 = C2f(c4 + c3, c3, 1)                                            # P3 out
        self.h16, self.h18 = Conv(c3, c3, 3, 2), C2f(c3 + c4, c4, 1)              # P4 out
        self.h19, self.h21 = Conv(c4, c4, 3, 2), C2f(c4 + c5, c5, 1)              # P5 out
        self.detect = Detect(nc, (c3, c4, c5))

    def forward(self, x):
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat([self.up(p5), p4], 1))
        h15 = self.h15(torch.cat([self.up(h12), p3], 1))
        h18 = self.h18(torch.cat([self.h16(h15), h12], 1))
        h21 = self.h21(torch.cat([self.h19(h18), p5], 1))
        return self.detect([h15, h18, h21])


def yolov8(seed: int = 0, dynamic: bool = True, opset: int = 12, imgsz: int = 640):
    """A tiny YOLOv8 detector exported the way ultralytics' ``export_onnx`` does: BN fused into the
    convs, Detect in export mode, two dry runs, then ``torch.onnx.export(dynamo=False,
    do_constant_folding=True, input_names=['images'], output_names=['output0'])`` with, when
    ``dynamic``, ``{'images': {0: 'batch', 2: 'height', 3: 'width'}, 'output0': {0: 'batch',
    2: 'anchors'}}`` (anchors and strides then come from Shape/Range ops; static exports carry them
    as constants), and ultralytics-like metadata_props. Output [b, 4 + nc, anchors].
    ``imgsz`` (a multiple of 32) is the export and dry-run size, the static model's only size
    (``yolov8(dynamic=False, imgsz=64)`` is a quick static variant).
    Not reproduced: the optional onnxslim pass ultralytics runs afterwards (``simplify``)."""
    assert opset in (11, 12, 13, 14, 15, 16, 17) and imgsz % 32 == 0, (opset, imgsz)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TinyYOLOv8()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.from_numpy(rng.standard_normal(m.weight.shape) / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, m.bias.shape)))
            elif isinstance(m, nn.BatchNorm2d):
                for t, a in zip((m.weight, m.bias, m.running_mean, m.running_var), _bn_params(rng, m.num_features)):
                    t.copy_(torch.from_numpy(a))
        model.detect.bias_init()
        # running statistics measured on random images (so the folded BNs really normalise), then a
        # deterministic perturbation so that folding is not an identity on the statistics
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(2):
            model(torch.randn(2, 3, 128, 128, generator=gen))
        for m in bns:
            m.running_var.mul_(torch.from_numpy(rng.uniform(0.8, 1.25, m.num_features)).float())
            m.momentum = 0.1
    for m in model.modules():
        if isinstance(m, Conv):
            m.fuse()
    model.eval()
    model.detect.dynamic = dynamic
    im = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        for _ in range(2):
            model(im)  # dry runs (cache anchors at the export shape)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}} if dynamic else None
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, im, f, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    m = onnx.load_from_string(f.getvalue())
    meta = {"description": "Ultralytics YOLOv8n-tiny model (graphprune sample)", "author": "Ultralytics",
            "stride": "32", "task": "detect", "batch": "1", "imgsz": f"[{imgsz}, {imgsz}]",
            "names": "{0: 'a', 1: 'b', 2: 'c'}"}
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return m, {"input": "images", "shape": [1, 3, imgsz, imgsz], "second_shape": [1, 3, 320, 416] if dynamic else None,
               "producer": "ultralytics", "stride": 32}


PRODUCERS = {
    "paddle_det": paddle_det,
    "paddle_rec": paddle_rec,
    "caffe2_zoo": caffe2_zoo,
    "yolov8": yolov8,
    "tf2onnx_cnn": tf2onnx_cnn,
}


def _check(model: onnx.ModelProto, info: dict) -> list[tuple[list[int], list[tuple]]]:
    """onnx.checker (full) + onnxruntime at info["shape"] and info["second_shape"]."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # caffe2_zoo: initializers listed as inputs (IR 3) warn once each
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    results = []
    for shape in (info["shape"], info["second_shape"]):
        if shape is None:
            continue
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        outs = sess.run(None, {info["input"]: x})
        results.append((shape, [(o.shape, float(np.std(o))) for o in outs]))
    return results


if __name__ == "__main__":
    import sys
    import time

    variants = {
        "paddle_det": {}, "paddle_det(opset=12,minus_one)": dict(opset=12, minus_one=True),
        "paddle_rec": {}, "paddle_rec(seq=reshape)": dict(seq="reshape"),
        "caffe2_zoo": {}, "caffe2_zoo(opset=7)": dict(opset=7), "caffe2_zoo(opset=9)": dict(opset=9),
        "yolov8": {}, "yolov8(dynamic=False,opset=17)": dict(dynamic=False, opset=17),
        "yolov8(dynamic=False,imgsz=64)": dict(dynamic=False, imgsz=64),
        "tf2onnx_cnn": {}, "tf2onnx_cnn(dynamic)": dict(dynamic=True),
    }
    only = sys.argv[1:]
    for label, kw in variants.items():
        name = label.split("(")[0]
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        model, info = PRODUCERS[name](**kw)
        res = _check(model, info)
        hist = collections.Counter(n.op_type for n in model.graph.node)
        print(f"{label}: opset {model.opset_import[0].version}, {len(model.graph.node)} nodes, "
              f"{len(model.graph.initializer)} initializers, {time.perf_counter() - t0:.2f}s")
        print("  ops:", dict(sorted(hist.items(), key=lambda kv: -kv[1])))
        for shape, outs in res:
            print("  ", shape, "->", ", ".join(f"{list(s)} (std {sd:.3g})" for s, sd in outs))
