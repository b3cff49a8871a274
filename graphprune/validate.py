"""Load-time validation: opset, checker, quantized graphs, tensor sizes and values, names, groups.

Every failure is a one-line UserError naming the model; nothing here modifies the model."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UserError
from .rules.base import DEFAULT_DOMAINS as _DEFAULT_DOMAINS

MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()


def _all_tensors(model: onnx.ModelProto):
    yield from onnx.external_data_helper._get_all_tensors(model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return imp.version
    return 0



#: ops of quantized graphs: graphprune prunes float graphs only
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                        "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM",
                        "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QOrderedMatMul", "QOrderedGelu"})
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_INT_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                        onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64,
                        onnx.TensorProto.UINT64,
                        *(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2")
                          if hasattr(onnx.TensorProto, n))})


def validate_model(model: onnx.ModelProto, name: str, *, check: bool = True,
                   path: str | os.PathLike | None = None) -> None:
    """Opset range and onnx.checker; with ``path`` the checker reads the file (external data stays on disk)."""
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{name}: opset {opset} is not supported (graphprune supports {MIN_OPSET}..{MAX_OPSET})")
    if check:
        try:
            onnx.checker.check_model(str(path) if path is not None else model)
        except Exception as exc:
            raise UserError(f"{name}: fails onnx.checker ({_first_line(exc)})") from None
        try:  # strict shape inference: what the pruned model must pass too (a conflict is the input's)
            onnx.checker.check_model(str(path) if path is not None else model, full_check=True)
        except Exception as exc:
            raise UserError(f"{name}: fails onnx shape inference ({_first_line(exc)})") from None


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def quantization_findings(model: onnx.ModelProto) -> list[str]:
    """What makes a model quantized: quantization ops, integer weights of Conv/Gemm/MatMul (directly or
    through a Cast). Empty for float models."""
    counts: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        if node.op_type in _QUANT_OPS or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    found = [f"{op} x{n}" if n > 1 else op for op, n in sorted(counts.items())]
    inits = {t.name: t.data_type for t in model.graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type == "Cast" and len(n.input) == 1 and len(n.output) == 1}
    int_weights = []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or node.domain not in _DEFAULT_DOMAINS:
            continue
        for name in node.input[1:2]:
            src = cast_of.get(name, name)
            if inits.get(src) in _INT_TYPES:
                int_weights.append(f"{node.op_type} {node.name or node.output[0]!r}")
    if int_weights:
        more = f" and {len(int_weights) - 2} more" if len(int_weights) > 2 else ""
        found.append(f"integer weights feeding {', '.join(int_weights[:2])}{more}")
    return found


def refuse_quantized(model: onnx.ModelProto, name: str) -> None:
    found = quantization_findings(model)
    if found:
        raise UserError(f"{name}: quantized model ({'; '.join(found)}); graphprune prunes float models only: "
                        "prune the float model, then quantize it")


_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
_PACKED = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1",
                                                             "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(onnx.TensorProto, n))


_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
           onnx.TensorProto.FLOAT16: np.float16}


def _check_finite(values: np.ndarray, tensor: str, is_weight: bool, name: str) -> None:
    """NaN in a constant, or Inf in a layer's weights, makes scores and the masked-original check meaningless
    (0 x NaN is NaN): refuse. Inf elsewhere (attention masks, clip bounds) is legitimate."""
    finite = np.isfinite(values)
    if finite.all():
        return
    if np.isnan(values).any():
        raise UserError(f"{name}: tensor {tensor!r} contains NaN values")
    if is_weight:
        raise UserError(f"{name}: layer weight {tensor!r} contains infinite values")


def check_tensor_sizes(model: onnx.ModelProto, name: str) -> None:
    """Every constant holds as many values as its dims say (the checker does not look); no NaN."""
    weights = {i for n in model.graph.node if n.op_type in _WEIGHT_OPS for i in n.input[1:]}
    for t in _all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise UserError(f"{name}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if t.data_type in _PACKED or t.data_type == onnx.TensorProto.STRING:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            raise UserError(f"{name}: tensor {t.name!r} has an unknown data type {t.data_type}") from None
        if t.HasField("raw_data"):
            raw = t.raw_data
            have = len(raw)
            if have != count * itemsize:
                raise UserError(f"{name}: tensor {t.name!r} holds {have} bytes of data, its shape {list(t.dims)} "
                                f"needs {count * itemsize}")
            if t.data_type in _FLOATS:
                _check_finite(np.frombuffer(raw, dtype=_FLOATS[t.data_type]), t.name, t.name in weights, name)
            del raw
            continue
        if t.data_type in _FLOATS and t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                values = numpy_helper.to_array(t)
            except Exception:
                raise UserError(f"{name}: tensor {t.name!r} cannot be decoded") from None
            _check_finite(values, t.name, t.name in weights, name)
        have = sum(len(getattr(t, f)) for f in _FIELDS)
        per = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
        if t.data_location != onnx.TensorProto.EXTERNAL and have != count * per:
            raise UserError(f"{name}: tensor {t.name!r} holds {have} values, its shape {list(t.dims)} "
                            f"needs {count * per}")


def check_conv_groups(model: onnx.ModelProto, name: str) -> None:
    """Conv/ConvTranspose `group` must divide the weight's channel axis (onnx.checker does not look;
    onnxruntime would fail later, inside the pipeline)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in _DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = dims.get(node.input[1])
        if group < 1 or (w is not None and (len(w) < 3 or w[0] % group)):
            raise UserError(f"{name}: {node.op_type} {node.name!r} has group={group}, which does not fit its "
                            f"weight of shape {w}")


def check_graph_names(model: onnx.ModelProto, name: str) -> None:
    """What onnx.checker lets through but would break the trace: a tensor produced twice, an
    initializer without a name."""
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    if any(not t.name for t in model.graph.initializer):
        raise UserError(f"{name}: an initializer has no name")
    g = model.graph
    texts = [g.name, *(n for v in [*g.input, *g.output, *g.value_info, *g.initializer] for n in (v.name,))]
    for node in _all_nodes(g):
        texts += [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
    bad = next((t for t in texts if not isinstance(t, str)), None)  # protobuf hands back bytes for bad UTF-8
    if bad is not None:
        raise UserError(f"{name}: name {bytes(bad)[:60]!r} is not valid UTF-8 text")
    for node in _all_nodes(model.graph):
        for a in node.attribute:
            try:
                if a.type == onnx.AttributeProto.STRING:
                    a.s.decode("utf-8")
                elif a.type == onnx.AttributeProto.STRINGS:
                    [v.decode("utf-8") for v in a.strings]
            except UnicodeDecodeError:
                raise UserError(f"{name}: attribute {a.name!r} of node {node.name!r} is not valid UTF-8 text") from None
    for node in model.graph.node:
        for out in node.output:
            if out and out in produced:
                raise UserError(f"{name}: tensor {out!r} is produced more than once")
            produced.add(out)
