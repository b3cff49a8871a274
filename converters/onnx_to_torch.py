"""Run an ONNX graph as a differentiable PyTorch module (float32, CPU or CUDA).

Used to compute gradients / curvature statistics for pruning criteria: the weights and biases of
every layer (Conv, ConvTranspose, Gemm, MatMul) become ``nn.Parameter`` leaves, every other
constant a buffer. Each ONNX op is one small function in :data:`OPS` taking
``(node, inputs, ctx)`` and returning its outputs as a list. Shape arithmetic (Shape, Gather,
Concat, ...) runs on int64 tensors and is turned into Python ints only where torch needs them,
so graphs exported with a dynamic batch run at any batch size.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from onnx import TensorProto

__all__ = ["LAYER_OPS", "OPS", "ExecutionError", "TorchGraph", "UnsupportedOpError"]

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


class ExecutionError(RuntimeError):
    """A node failed while the executor ran it (a shape the model cannot take, such as a batch its
    Reshapes do not allow): names the node and the op, with torch's first line."""

    def __init__(self, op: str, node: str, detail: str):
        self.op, self.node = op, node
        super().__init__(f"the PyTorch executor failed at node '{node}' ({op}): {detail}")


class UnsupportedOpError(Exception):
    """An ONNX op (or an op variant) the executor has no implementation for."""

    def __init__(self, op: str, node: str, detail: str = ""):
        self.op, self.node = op, node
        msg = f"cannot execute ONNX op '{op}' (node '{node}') in PyTorch"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class _Ctx:
    __slots__ = ("opset", "device")

    def __init__(self, opset: int, device: torch.device):
        self.opset, self.device = opset, device


# --------------------------------------------------------------------------- helpers
def _opt(inputs, i):
    return inputs[i] if len(inputs) > i else None


def _ints(t) -> list[int] | None:
    if t is None:
        return None
    v = t.tolist()
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _tensor(arr, device=None) -> torch.Tensor:
    """numpy -> torch under the dtype policy: floats float32, integers int64, bools kept."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        out = np.array(arr, dtype=np.bool_)
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype.kind == "V":  # "V": bfloat16-like ml_dtypes
        out = np.array(arr, dtype=np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.array(arr, dtype=np.int64)
    else:
        raise TypeError(f"unsupported constant dtype {arr.dtype}")
    return torch.from_numpy(out).to(device) if device is not None else torch.from_numpy(out)


def _const_array(t) -> np.ndarray:
    """Values of a gs.Constant without caching lazily loaded data on the caller's graph."""
    v = getattr(t, "_values", None)
    if v is None:
        v = t.values
    return np.asarray(v.load() if hasattr(v, "load") else v)


def _dtype_of(onnx_type: int) -> torch.dtype:
    if onnx_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return torch.float32
    return torch.bool if onnx_type == TensorProto.BOOL else torch.int64


def _torch_pad(begins, ends) -> list[int]:
    """ONNX per-axis (begin, end) pads -> F.pad order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _auto_pads(node, x, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """(begins, ends) of the spatial axes for Conv / pooling, honouring auto_pad."""
    nd = len(kernel)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            b = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begins.append(b)
            ends.append(total - b)
        return begins, ends
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


# --------------------------------------------------------------------------- layers
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(node, inp, ctx):
    x, w, b = inp[0], inp[1], _opt(inp, 2)
    nd, a = w.dim() - 2, node.attrs
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    begins, ends = _auto_pads(node, x, w.shape[2:], strides, dil)
    if begins != ends:
        x, begins = F.pad(x, _torch_pad(begins, ends)), [0] * nd
    return [_CONV[nd](x, w, b, strides, begins, dil, a.get("group", 1))]


def _conv_transpose(node, inp, ctx):
    x, w, b = inp[0], inp[1], _opt(inp, 2)
    nd, a = w.dim() - 2, node.attrs
    s, d = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    op, g, k = list(a.get("output_padding", [0] * nd)), a.get("group", 1), w.shape[2:]
    auto, out_shape = a.get("auto_pad", "NOTSET"), a.get("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):  # pads from the output shape (spec)
        out_shape = list(out_shape)[-nd:] if out_shape is not None else [x.shape[2 + i] * s[i] for i in range(nd)]
        begins, ends = [], []
        for i in range(nd):
            total = max(0, s[i] * (x.shape[2 + i] - 1) + op[i] + (k[i] - 1) * d[i] + 1 - out_shape[i])
            head = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begins.append(head)
            ends.append(total - head)
    elif auto == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
        begins, ends = pads[:nd], pads[nd:]
    if begins == ends and all(op[i] < max(s[i], d[i]) for i in range(nd)):
        return [_CONVT[nd](x, w, b, s, begins, op, g, d)]
    y = _CONVT[nd](x, w, None, s, 0, 0, g, d)  # full output, then crop / extend (negative pads crop)
    y = F.pad(y, _torch_pad([-p for p in begins], [op[i] - ends[i] for i in range(nd)]))
    return [y if b is None else y + b.reshape(1, -1, *([1] * nd))]


def _gemm(node, inp, ctx):
    A, B, C = inp[0], inp[1], _opt(inp, 2)
    a = node.attrs
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        if alpha == 1 and (C is None or (beta == 1 and C.dim() == 1 and C.shape[0] == B.shape[0])):
            return [F.linear(A, B, C)]
        B = B.t()
    y = A @ B
    if alpha != 1:
        y = y * alpha
    if C is not None and beta != 0:
        y = y + (C if beta == 1 else C * beta)
    return [y]


def _matmul(node, inp, ctx):
    return [torch.matmul(inp[0], inp[1])]


def _einsum(node, inp, ctx):
    return [torch.einsum(node.attrs["equation"], *inp)]


def _attention(node, inp, ctx):
    """ONNX Attention (opset 23+): 3-D or 4-D q/k/v, GQA, boolean or additive mask (padded with
    "masked" to the key length), past key / value, causal and sliding-window masks aligned to the
    bottom right, softcap and the qk_matmul_output modes; fully masked rows give 0 (as the spec)."""
    q, k, v = inp[:3]
    mask, past_k, past_v, nonpad = _opt(inp, 3), _opt(inp, 4), _opt(inp, 5), _opt(inp, 6)
    a = node.attrs
    three_d = q.dim() == 3
    if three_d:
        hq, hkv = a["q_num_heads"], a["kv_num_heads"]

        def heads(t, h):  # (B, S, h*D) -> (B, h, S, D)
            return t.reshape(t.shape[0], t.shape[1], h, t.shape[2] // h).transpose(1, 2)

        q, k, v = heads(q, hq), heads(k, hkv), heads(v, hkv)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    present_k, present_v = k, v
    n_q, n_kv = q.shape[2], k.shape[2]
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)

    bias = None  # additive, broadcastable to (B, H, n_q, n_kv)
    if mask is not None:
        if mask.shape[-1] < n_kv:
            pad = n_kv - mask.shape[-1]
            mask = F.pad(mask, (0, pad), value=False if mask.dtype == torch.bool else float("-inf"))
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = mask.to(q.dtype)
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    causal = bool(a.get("is_causal", 0))
    if causal or left >= 0 or right >= 0:
        if past_k is not None:
            offset = torch.tensor(past_k.shape[2], device=q.device)
        elif nonpad is not None:
            offset = (nonpad.reshape(-1, 1, 1, 1) - n_q).to(q.device)
        else:
            offset = torch.tensor(0, device=q.device)
        i = torch.arange(n_q, device=q.device).reshape(n_q, 1)
        j = torch.arange(n_kv, device=q.device).reshape(1, n_kv)
        diff = i + offset - j  # query position - key position
        allowed = torch.ones(diff.shape, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed & (diff >= 0)
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        extra = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = extra if bias is None else bias + extra
    if nonpad is not None:
        keep = torch.arange(n_kv, device=q.device).reshape(1, n_kv) < nonpad.reshape(-1, 1).to(q.device)
        extra = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        bias = extra.reshape(-1, 1, 1, n_kv) if bias is None else bias + extra.reshape(-1, 1, 1, n_kv)

    if q.shape[1] != k.shape[1]:  # grouped-query attention: repeat each kv head
        reps = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1)
    qk = torch.matmul(q, k.transpose(-1, -2)) * scale
    softcap = a.get("softcap", 0.0)
    if softcap and softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    mode = a.get("qk_matmul_output_mode", 0)
    if bias is None:
        probs = torch.softmax(qk, -1)
        with_bias = qk
    else:
        with_bias = qk + bias
        dead = torch.isneginf(bias.amax(-1, keepdim=True))  # rows with no key left: output 0
        probs = torch.softmax(qk + bias.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)  # finite grads
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    qk_out = probs if mode == 3 else with_bias if mode == 2 else qk  # 0 / 1: scaled (and softcapped) q k^T
    return [y, present_k, present_v, qk_out][: len(node.outputs)]


# --------------------------------------------------------------------------- normalisation
def _batchnorm(node, inp, ctx):
    x, scale, bias, mean, var = inp[:5]
    y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))
    return [y, mean, var][: len(node.outputs)]


def _instancenorm(node, inp, ctx):
    return [F.instance_norm(inp[0], weight=inp[1], bias=inp[2], eps=node.attrs.get("epsilon", 1e-5))]


def _layernorm(node, inp, ctx):
    x, scale, bias = inp[0], inp[1], _opt(inp, 2)
    axis, eps = _axis(node.attrs.get("axis", -1), x.dim()), node.attrs.get("epsilon", 1e-5)
    shape = x.shape[axis:]
    if scale.shape == shape and (bias is None or bias.shape == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    if len(node.outputs) == 1:
        return [y]
    dims = tuple(range(axis, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    return [y, mean, torch.rsqrt(var + eps)]


# --------------------------------------------------------------------------- elementwise
def _unary(fn: Callable) -> Callable:
    return lambda node, inp, ctx: [fn(inp[0])]


def _with_attrs(fn: Callable, **defaults) -> Callable:
    """Unary op whose ONNX attributes (with these defaults) become keyword arguments of fn."""
    return lambda node, inp, ctx: [fn(inp[0], **{k: node.attrs.get(k, v) for k, v in defaults.items()})]


def _binary(fn: Callable) -> Callable:
    return lambda node, inp, ctx: [fn(inp[0], inp[1])]


def _variadic(fn: Callable) -> Callable:
    return lambda node, inp, ctx: [functools.reduce(fn, inp)]


def _div(node, inp, ctx):
    a, b = inp
    if a.is_floating_point() or b.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


def _pow(node, inp, ctx):
    y = torch.pow(inp[0], inp[1])
    return [y if y.dtype == inp[0].dtype else y.to(inp[0].dtype)]


def _mod(node, inp, ctx):
    return [torch.fmod(inp[0], inp[1]) if node.attrs.get("fmod", 0) else torch.remainder(inp[0], inp[1])]


def _clip(node, inp, ctx):
    x = inp[0]
    if ctx.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
    else:
        lo, hi = _opt(inp, 1), _opt(inp, 2)
        if x.device.type == "cpu":  # python scalars take the fast path
            lo = lo.item() if lo is not None and lo.numel() == 1 else lo
            hi = hi.item() if hi is not None and hi.numel() == 1 else hi
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, lo, hi)]


def _hardsigmoid(node, inp, ctx):
    return [torch.clamp(inp[0] * node.attrs.get("alpha", 0.2) + node.attrs.get("beta", 0.5), 0.0, 1.0)]


def _prelu(node, inp, ctx):
    x, slope = inp
    return [torch.where(x >= 0, x, x * slope)]


def _selu(node, inp, ctx):
    a = node.attrs
    return [F.elu(inp[0], a.get("alpha", 1.67326319217681884765625)) * a.get("gamma", 1.05070102214813232421875)]


def _thresholded_relu(node, inp, ctx):
    x = inp[0]
    return [torch.where(x > node.attrs.get("alpha", 1.0), x, torch.zeros_like(x))]


def _softmax_family(fn: Callable) -> Callable:
    def run(node, inp, ctx):
        x = inp[0]
        if ctx.opset >= 13:
            return [fn(x, _axis(node.attrs.get("axis", -1), x.dim()))]
        axis = _axis(node.attrs.get("axis", 1), x.dim())  # opset < 13: coerce to 2-D
        flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return [fn(flat, 1).reshape(x.shape)]

    return run


def _cast(node, inp, ctx):
    return [inp[0].to(_dtype_of(node.attrs["to"]))]


def _cast_like(node, inp, ctx):
    return [inp[0].to(inp[1].dtype)]


def _identity(node, inp, ctx):
    return [inp[0]]


def _dropout(node, inp, ctx):
    x = inp[0]
    return [x, torch.ones_like(x, dtype=torch.bool)][: len(node.outputs)]


def _where(node, inp, ctx):
    return [torch.where(inp[0], inp[1], inp[2])]


def _trilu(node, inp, ctx):
    k = _ints(_opt(inp, 1))
    k = k[0] if k else 0
    fn = torch.triu if node.attrs.get("upper", 1) else torch.tril
    return [fn(inp[0], k)]


def _cumsum(node, inp, ctx):
    x, a = inp[0], node.attrs
    axis = _axis(_ints(inp[1])[0], x.dim())
    if a.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if a.get("exclusive", 0) and x.shape[axis]:  # shift by one: element i sums elements before i
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, x.shape[axis] - 1)], axis)
    if a.get("reverse", 0):
        y = y.flip(axis)
    return [y]


# --------------------------------------------------------------------------- shape & layout
def _concat(node, inp, ctx):
    return [torch.cat([t for t in inp if t is not None], node.attrs["axis"])]


def _split(node, inp, ctx):
    x, a = inp[0], node.attrs
    axis = _axis(a.get("axis", 0), x.dim())
    sizes = _ints(_opt(inp, 1)) or a.get("split")
    if sizes:
        return list(torch.split(x, list(sizes), axis))
    n = a.get("num_outputs") or len(node.outputs)
    return list(torch.split(x, -(-x.shape[axis] // n), axis))


def _slice(node, inp, ctx):
    x = inp[0]
    if ctx.opset < 10:
        a = node.attrs
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends, axes, steps = _ints(inp[1]), _ints(inp[2]), _ints(_opt(inp, 3)), _ints(_opt(inp, 4))
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index, flips = [slice(None)] * x.dim(), []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = _axis(ax, x.dim())
        dim = x.shape[ax]
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        if st > 0:
            index[ax] = slice(min(max(s, 0), dim), min(max(e, 0), dim), st)
        else:  # torch has no negative steps: flip the axis and slice forward
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            flips.append(ax)
            index[ax] = slice(dim - 1 - s, dim - 1 - e, -st)
    if flips:
        x = x.flip(flips)
    return [x[tuple(index)]]


def _gather(node, inp, ctx):
    x, idx = inp
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))]


def _gather_elements(node, inp, ctx):
    x, idx = inp
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))]


def _reshape(node, inp, ctx):
    x, shape = inp[0], _ints(inp[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(node, inp, ctx):
    x = inp[0]
    axis = _axis(node.attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _transpose(node, inp, ctx):
    x = inp[0]
    perm = node.attrs.get("perm")
    return [x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))]


def _axes_of(node, inp):
    """Axes from the second input (newer opsets) or the ``axes`` attribute (older ones)."""
    axes = _ints(_opt(inp, 1))
    return axes if axes is not None else node.attrs.get("axes")


def _squeeze(node, inp, ctx):
    x, axes = inp[0], _axes_of(node, inp)
    if not axes:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


def _unsqueeze(node, inp, ctx):
    x, axes = inp[0], _axes_of(node, inp)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _expand(node, inp, ctx):
    x = inp[0]
    return [x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(inp[1]))))]


def _tile(node, inp, ctx):
    return [inp[0].repeat(_ints(inp[1]))]


def _shape(node, inp, ctx):
    x = inp[0]
    dims = list(x.shape)[node.attrs.get("start", 0):node.attrs.get("end")]
    return [torch.tensor(dims, dtype=torch.int64, device=x.device)]


def _size(node, inp, ctx):
    return [torch.tensor(inp[0].numel(), dtype=torch.int64, device=inp[0].device)]


def _constant_of_shape(node, inp, ctx):
    value = node.attrs.get("value")
    v = _tensor(_const_array(value)) if value is not None else torch.zeros(1)
    return [torch.full(_ints(inp[0]), v.reshape(-1)[0].item(), dtype=v.dtype, device=ctx.device)]


def _range(node, inp, ctx):
    start, limit, delta = inp
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


def _constant(node, inp, ctx):
    a = node.attrs
    if "value" in a:
        return [_tensor(_const_array(a["value"]), ctx.device)]
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return [_tensor(np.asarray(a[key], dtype=np.float32 if "float" in key else np.int64), ctx.device)]
    raise ValueError(f"Constant node {node.name!r} has no supported value attribute")


def _pad(node, inp, ctx):
    x, a = inp[0], node.attrs
    rank, mode = x.dim(), a.get("mode", "constant")
    if _opt(inp, 1) is not None:
        pads, value, axes = _ints(inp[1]), _opt(inp, 2), _ints(_opt(inp, 3))
        value = value.item() if value is not None and value.numel() else 0.0
    else:
        pads, value, axes = list(a["pads"]), a.get("value", 0.0), None
    axes = [_axis(v, rank) for v in axes] if axes else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begins[ax], ends[ax] = pads[i], pads[len(axes) + i]
    first = next((i for i in range(rank) if begins[i] or ends[i]), rank)  # torch pads trailing axes only
    tp = _torch_pad(begins[first:], ends[first:])
    if not tp:
        return [x]
    if mode == "constant":
        return [F.pad(x, tp, value=float(value))]
    return [F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])]


# --------------------------------------------------------------------------- pooling & reductions
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _maxpool(node, inp, ctx):
    x, a = inp[0], node.attrs
    k = list(a["kernel_shape"])
    nd = len(k)
    s, d = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    begins, ends = _auto_pads(node, x, k, s, d)
    if begins != ends or any(p > kk // 2 for p, kk in zip(begins, k)):
        x, begins = F.pad(x, _torch_pad(begins, ends), value=float("-inf")), [0] * nd
    return [_MAXPOOL[nd](x, k, s, begins, d, ceil_mode=bool(a.get("ceil_mode", 0)))]


def _avgpool(node, inp, ctx):
    x, a = inp[0], node.attrs
    k = list(a["kernel_shape"])
    nd = len(k)
    s = list(a.get("strides", [1] * nd))
    begins, ends = _auto_pads(node, x, k, s, [1] * nd)
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    pool = _AVGPOOL[nd]
    if begins == ends and all(p <= kk // 2 for p, kk in zip(begins, k)):
        return [pool(x, k, s, begins, ceil, include)]
    tp = _torch_pad(begins, ends)
    y = pool(F.pad(x, tp), k, s, 0, ceil, True)
    if not include:  # divide by the number of real (unpadded) elements in each window
        ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), tp)
        y = y / pool(ones, k, s, 0, ceil, True)
    return [y]


def _global_pool(fn: Callable) -> Callable:
    return lambda node, inp, ctx: [fn(inp[0], tuple(range(2, inp[0].dim())), keepdim=True)]


def _reduce_prod(x, axes, keep):
    for ax in sorted(axes, reverse=True):
        x = x.prod(ax, keepdim=keep)
    return x


_REDUCERS = {
    "ReduceMean": lambda x, ax, k: x.mean(ax, keepdim=k),
    "ReduceSum": lambda x, ax, k: x.sum(ax, keepdim=k),
    "ReduceMax": lambda x, ax, k: x.amax(ax, keepdim=k),
    "ReduceMin": lambda x, ax, k: x.amin(ax, keepdim=k),
    "ReduceL1": lambda x, ax, k: torch.linalg.vector_norm(x, 1, ax, k),
    "ReduceL2": lambda x, ax, k: torch.linalg.vector_norm(x, 2, ax, k),
    "ReduceSumSquare": lambda x, ax, k: (x * x).sum(ax, keepdim=k),
    "ReduceLogSumExp": lambda x, ax, k: torch.logsumexp(x, ax, keepdim=k),
    "ReduceProd": _reduce_prod,
}


def _reduce(node, inp, ctx):
    x, a = inp[0], node.attrs
    axes = _axes_of(node, inp)
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return [x]
        axes = range(x.dim())
    axes = tuple(sorted({_axis(v, x.dim()) for v in axes}))
    return [_REDUCERS[node.op](x, axes, bool(a.get("keepdims", 1)))]


def _arg_family(fn: Callable) -> Callable:
    def run(node, inp, ctx):
        x, a = inp[0], node.attrs
        axis, keep = _axis(a.get("axis", 0), x.dim()), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            return [x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)]
        return [fn(x, axis, keepdim=keep)]

    return run


def _topk(node, inp, ctx):
    x, a = inp[0], node.attrs
    k = _ints(inp[1])[0] if _opt(inp, 1) is not None else a["k"]
    values, indices = torch.topk(x, k, _axis(a.get("axis", -1), x.dim()), bool(a.get("largest", 1)), True)
    return [values, indices]


# --------------------------------------------------------------------------- resize
def _source_coords(mode: str, n_in: int, n_out: int, scale: float) -> np.ndarray:
    """Input coordinate of each output position along one axis (float32, as onnxruntime computes it)."""
    xr, s = np.arange(n_out, dtype=np.float32), np.float32(scale)
    half = np.float32(0.5)
    if mode == "asymmetric":
        return xr / s
    if mode == "align_corners":
        return np.zeros_like(xr) if n_out == 1 else xr * np.float32(n_in - 1) / np.float32(n_out - 1)
    if mode == "pytorch_half_pixel":
        return (xr + half) / s - half if n_out > 1 else np.zeros_like(xr)
    if mode == "tf_half_pixel_for_nn":
        return (xr + half) / s
    if mode == "half_pixel_symmetric":
        adj = np.float32(n_out) / (s * np.float32(n_in))
        return np.float32(n_in) / 2 * (1 - adj) + (xr + half) / s - half
    return (xr + half) / s - half  # half_pixel


_NEAREST = {
    "round_prefer_floor": lambda c: np.where(c == np.floor(c) + 0.5, np.floor(c), np.floor(c + 0.5)),
    "round_prefer_ceil": lambda c: np.floor(c + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _resize(node, inp, ctx):
    x, a = inp[0], node.attrs
    rank = x.dim()
    if node.op == "Upsample" or ctx.opset < 11:
        scales, sizes = (_opt(inp, 1) if _opt(inp, 1) is not None else a.get("scales")), None
        ctm = "asymmetric"
        nmode = "floor" if node.op == "Upsample" else a.get("nearest_mode", "round_prefer_floor")
    else:
        scales, sizes = _opt(inp, 2), _opt(inp, 3)
        ctm, nmode = a.get("coordinate_transformation_mode", "half_pixel"), a.get("nearest_mode", "round_prefer_floor")
    scales = [float(v) for v in (scales.tolist() if torch.is_tensor(scales) else scales)] if scales is not None else []
    sizes = _ints(sizes) if sizes is not None and sizes.numel() else []
    axes = [_axis(v, rank) for v in a.get("axes", range(rank))]
    out, scale = list(x.shape), [1.0] * rank
    for i, ax in enumerate(axes):
        if sizes:
            out[ax], scale[ax] = sizes[i], sizes[i] / x.shape[ax]
        else:
            out[ax], scale[ax] = int(math.floor(x.shape[ax] * scales[i])), scales[i]
    linear = a.get("mode", "nearest") in ("linear", "bilinear", "trilinear")
    y = x
    for ax in range(rank):
        n_in, n_out = x.shape[ax], out[ax]
        if n_in == n_out and scale[ax] == 1.0:
            continue
        c = _source_coords(ctm, n_in, n_out, scale[ax])
        if not linear:
            idx = np.clip(_NEAREST[nmode](c), 0, n_in - 1).astype(np.int64)
            y = y.index_select(ax, torch.from_numpy(idx).to(y.device))
            continue
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        w = torch.from_numpy((c - lo).astype(np.float32)).to(y.device).reshape(-1, *([1] * (rank - ax - 1)))
        y0 = y.index_select(ax, torch.from_numpy(lo).to(y.device))
        y1 = y.index_select(ax, torch.from_numpy(hi).to(y.device))
        y = y0 + (y1 - y0) * w
    return [y]


# --------------------------------------------------------------------------- registry
OPS: dict[str, Callable] = {
    # layers
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum,
    "Attention": _attention,
    # normalisation
    "BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm, "LayerNormalization": _layernorm,
    # activations
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Clip": _clip, "HardSigmoid": _hardsigmoid, "HardSwish": _unary(F.hardswish),
    "LeakyRelu": lambda node, inp, ctx: [F.leaky_relu(inp[0], node.attrs.get("alpha", 0.01))], "PRelu": _prelu,
    "Elu": _with_attrs(F.elu, alpha=1.0), "Selu": _selu, "Celu": _with_attrs(F.celu, alpha=1.0),
    "ThresholdedRelu": _thresholded_relu,
    "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign), "Mish": _unary(F.mish),
    "Gelu": _with_attrs(F.gelu, approximate="none"),
    "Softmax": _softmax_family(torch.softmax), "LogSoftmax": _softmax_family(torch.log_softmax),
    # unary math
    "Erf": _unary(torch.erf), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Sign": _unary(torch.sign), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Not": _unary(torch.logical_not),
    "Identity": _identity, "Dropout": _dropout, "Cast": _cast, "CastLike": _cast_like,
    # binary / variadic
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _pow, "Mod": _mod,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": lambda node, inp, ctx: [functools.reduce(torch.add, inp) / len(inp)],
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Where": _where, "Trilu": _trilu, "CumSum": _cumsum,
    # shape & layout
    "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Expand": _expand, "Tile": _tile, "Shape": _shape, "Size": _size,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Constant": _constant, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize,
    # pooling & reductions
    "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": _global_pool(torch.mean), "GlobalMaxPool": _global_pool(torch.amax),
    **{op: _reduce for op in _REDUCERS},
    "ArgMax": _arg_family(torch.argmax), "ArgMin": _arg_family(torch.argmin), "TopK": _topk,
}


def _check_resize(node) -> str | None:
    a = node.attrs
    if a.get("mode", "nearest") not in ("nearest", "linear", "bilinear", "trilinear"):
        return f"mode {a.get('mode')!r}"
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    if ctm == "tf_crop_and_resize":
        return "coordinate_transformation_mode 'tf_crop_and_resize'"
    if a.get("mode", "nearest") == "nearest" and a.get("nearest_mode", "round_prefer_floor") not in _NEAREST:
        return f"nearest_mode {a.get('nearest_mode')!r}"
    if a.get("antialias", 0):
        return "antialias"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy {a.get('keep_aspect_ratio_policy')!r}"
    return None


#: op variants the functions above do not cover: op -> check(node) returning a reason or None
_CHECKS: dict[str, Callable] = {
    "Resize": _check_resize,
    "Upsample": _check_resize,
    "AveragePool": lambda n: "dilations" if any(d != 1 for d in n.attrs.get("dilations", [])) else None,
    "MaxPool": lambda n: "indices output" if len(n.outputs) > 1 and n.outputs[1].name else None,
    "Pad": lambda n: f"mode {n.attrs.get('mode')!r}"
    if n.attrs.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap") else None,
}


# --------------------------------------------------------------------------- module
class _Step(NamedTuple):
    node: gs.Node
    fn: Callable
    inputs: tuple  # tensor names ("" for an omitted optional input)
    outputs: tuple
    free: tuple  # names no later step needs
    layer: bool


def _topo_order(graph: gs.Graph) -> list:
    """The nodes in a valid execution order (graph.nodes itself when already sorted; graph untouched)."""
    producer = {t.name: k for k, n in enumerate(graph.nodes) for t in n.outputs if t.name}
    deps = [{producer[t.name] for t in n.inputs if t.name in producer} for n in graph.nodes]
    if all(p < k for k, d in enumerate(deps) for p in d):
        return list(graph.nodes)
    users: list[list[int]] = [[] for _ in graph.nodes]
    for k, d in enumerate(deps):
        for p in d:
            users[p].append(k)
    waiting = [len(d) for d in deps]
    order = [k for k, w in enumerate(waiting) if w == 0]
    for k in order:  # Kahn's algorithm
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                order.append(u)
    if len(order) != len(graph.nodes):
        raise ValueError("graph has a cycle")
    return [graph.nodes[k] for k in order]


class TorchGraph(torch.nn.Module):
    """An ONNX graph as a differentiable torch module; ``forward`` returns all graph outputs in order.

    ``share_weights=True`` (CPU only) wraps float32 constants of the graph without copying them: the
    module then reads the graph's own arrays (memory for huge models), and ``set_weights`` refuses
    to run, since it would write into the graph."""

    def __init__(self, graph, *, trainable: Iterable[str] | None = None, device="cpu", share_weights: bool = False):
        super().__init__()
        share_weights = bool(share_weights) and torch.device(device).type == "cpu"
        self.shares_weights = share_weights
        if isinstance(graph, onnx.ModelProto):
            from graphprune.tracer import to_graph

            graph = to_graph(graph)
        self.graph = graph
        self.opset = int(graph.opset or onnx.defs.onnx_opset_version())
        self.recorder: Callable | None = None
        nodes = _topo_order(graph)
        for node in nodes:  # validate everything before doing any work
            fn = OPS.get(node.op) if node.domain in _DEFAULT_DOMAINS else None
            if fn is None or list(node.subgraphs()):
                custom = node.domain not in _DEFAULT_DOMAINS
                raise UnsupportedOpError(node.op, node.name, f"domain {node.domain!r}" if custom else "")
            reason = _CHECKS[node.op](node) if node.op in _CHECKS else None
            if reason:
                raise UnsupportedOpError(node.op, node.name, reason)

        # constants: trainable ones as parameters, the rest as buffers
        constants: dict[str, gs.Constant] = {}
        for node in nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    constants.setdefault(t.name, t)
        for t in graph.outputs:
            if isinstance(t, gs.Constant):
                constants.setdefault(t.name, t)
        if trainable is None:
            names: list[str] = []
            for node in nodes:
                if node.op in LAYER_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                    names += [t.name for t in node.inputs[1:3] if isinstance(t, gs.Constant)]
            trainable = names
        trainable = list(dict.fromkeys(trainable))
        for name in trainable:
            if name not in constants:
                raise KeyError(f"{name!r} is not a constant of the graph")
        self._params = torch.nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self._buffer_attr: dict[str, str] = {}
        wanted = set(trainable)
        for name, t in constants.items():
            arr = _const_array(t)
            if (share_weights and isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.ndim
                    and arr.flags.writeable and arr.flags.c_contiguous):
                value = torch.from_numpy(arr)  # the graph's own memory (nothing writes to it)
            else:
                value = _tensor(arr)
            if name in wanted:
                if not value.is_floating_point():
                    raise TypeError(f"constant {name!r} is not floating point and cannot be trainable")
                self._param_index[name] = len(self._params)
                self._params.append(torch.nn.Parameter(value))
            else:
                attr = f"_c{len(self._buffer_attr)}"
                self.register_buffer(attr, value, persistent=False)
                self._buffer_attr[name] = attr
        self._param_index = {n: self._param_index[n] for n in trainable}  # the order asked for
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

        self.input_names = [t.name for t in graph.inputs if not isinstance(t, gs.Constant)]
        self.output_names = [t.name for t in graph.outputs]
        known = set(self.input_names) | set(constants)
        for node in nodes:
            for t in node.inputs:
                if t.name and t.name not in known:
                    raise ValueError(f"tensor {t.name!r} (input of node {node.name!r}) is never produced")
            known.update(t.name for t in node.outputs if t.name)
        for name in self.output_names:
            if name not in known:
                raise ValueError(f"graph output {name!r} is never produced")
        self._steps = self._plan(nodes, set(constants))
        self.to(device)

    def _plan(self, nodes, constants: set[str]) -> list[_Step]:
        """Steps in execution order, each knowing which intermediates die after it."""
        keep = set(self.output_names) | constants
        last: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for t in node.outputs:
                if t.name:
                    last[t.name] = i  # an unused output dies right away
            for t in node.inputs:
                if t.name:
                    last[t.name] = i
        free: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep and name not in self.input_names:
                free.setdefault(i, []).append(name)
        return [_Step(node, OPS[node.op], tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs),
                      tuple(free.get(i, ())), node.op in LAYER_OPS) for i, node in enumerate(nodes)]

    # ------------------------------------------------------------------ weights
    def param(self, name: str) -> torch.nn.Parameter:
        """The parameter holding ONNX initializer ``name``."""
        if name not in self._param_index:
            raise KeyError(f"{name!r} is not a trainable parameter")
        return self._params[self._param_index[name]]

    def param_names(self) -> list[str]:
        return list(self._param_index)

    def _constant(self, name: str) -> torch.Tensor:
        if name in self._param_index:
            return self._params[self._param_index[name]]
        if name in self._buffer_attr:
            return getattr(self, self._buffer_attr[name])
        raise KeyError(f"{name!r} is not a constant of the graph")

    def set_weights(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite parameters / constants (by initializer name) in place."""
        if self.shares_weights:
            raise RuntimeError("this TorchGraph shares its weights with the graph (share_weights=True); "
                               "build it with share_weights=False to overwrite them")
        with torch.no_grad():
            for name, value in values.items():
                dst = self._constant(name)
                src = value.detach() if torch.is_tensor(value) else torch.from_numpy(np.asarray(value))
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{name!r}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))

    # ------------------------------------------------------------------ execution
    def _feeds(self, args, kwargs) -> dict:
        if len(args) > len(self.input_names):
            raise TypeError(f"expected at most {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise TypeError(f"unknown input {name!r}; inputs: {self.input_names}")
            if name in feeds:
                raise TypeError(f"input {name!r} given twice")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"missing inputs: {missing}")
        return feeds

    def forward(self, *args, **kwargs) -> list[torch.Tensor]:
        device = self._anchor.device
        env: dict[str, torch.Tensor] = {n: self._params[i] for n, i in self._param_index.items()}
        env.update((n, getattr(self, a)) for n, a in self._buffer_attr.items())
        for name, value in self._feeds(args, kwargs).items():
            t = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
            if t.is_floating_point():
                t = t.to(device=device, dtype=torch.float32)
            else:
                t = t.to(device=device, dtype=torch.bool if t.dtype == torch.bool else torch.int64)
            env[name] = t
        ctx, rec = _Ctx(self.opset, device), self.recorder
        for step in self._steps:
            inputs = [env[n] if n else None for n in step.inputs]
            try:
                outputs = step.fn(step.node, inputs, ctx)
            except (RuntimeError, IndexError, ValueError) as exc:
                if isinstance(exc, ExecutionError):
                    raise
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise ExecutionError(step.node.op, step.node.name, detail) from exc
            for name, t in zip(step.outputs, outputs):
                if name:
                    env[name] = t
            if rec is not None and step.layer:
                rec(step.node, inputs[0], outputs[0])
            for name in step.free:
                del env[name]
        return [env[n] for n in self.output_names]
