"""Stage: load and trace. A model file → (weight-free skeleton, trace holding the only copy of the weights)."""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..io import FILE_ROUTE_BYTES, load_model, opset_of, weight_bytes
from ..memory import prefer_mmap, trim
from ..shapes import resolve as resolve_shapes, second_size
from ..tracer import Trace, detach_weights, to_graph, trace


def load_and_trace(path: str | os.PathLike, input_shapes=None, calib: str | None = None,
                   hint=None) -> tuple[onnx.ModelProto, Trace]:
    """Load, validate and trace a model at its input size (``input_shapes``: ``--input-shape``
    strings or {input: dims}; else the shapes of the ``calib`` arrays; else the model's static dims;
    see graphprune.shapes.resolve). Returns (skeleton, trace): the trace's graph holds the only
    copy of the weights (external data is read from its files straight into the graph's arrays); the
    ModelProto is weight-free and carries the signature, opset and metadata. Run the original with
    ``GraphModel(trace.graph, skeleton)``; export a copy with ``export_graph``."""
    model = load_model(path, allow_quantized=False, load_external=False)
    shapes = resolve_shapes(model, input_shapes, calib, hint)
    if weight_bytes(model) >= FILE_ROUTE_BYTES:
        prefer_mmap()
    graph = to_graph(model, base=Path(path).parent)
    skeleton = detach_weights(model, graph)
    del model  # the loaded proto, and with it the proto's copy of the weights
    trim()
    return skeleton, trace(graph, opset_of(skeleton), shapes)


def retrace(model: onnx.ModelProto, like: Trace) -> Trace:
    """A fresh trace of an in-memory (pruned) model at ``like``'s input size."""
    return trace(to_graph(model), opset_of(model), like.input_shapes)


def upgrade_info(model: onnx.ModelProto) -> dict:
    """{"opset_upgraded": {...}} when load_model upgraded a legacy opset (recorded in the metadata)."""
    from ..io import upgraded_from

    old = upgraded_from(model)
    return {"opset_upgraded": {"from": old, "to": opset_of(model)}} if old is not None else {}


def check_sizes(model: onnx.ModelProto, tr: Trace) -> dict:
    """Keyword arguments for parity.compare: the trace's input size and, for models with dynamic
    non-batch dims, a second valid size (stepped by the model's stride)."""
    return {"shapes": tr.input_shapes, "second": second_size(model, tr.input_shapes, tr.state.static_shapes)}


def signature(model: onnx.ModelProto) -> dict:
    """Names, element types and declared dims of the inputs and outputs: what no stage may change."""
    def sig(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            out.append((v.name, tt.elem_type, dims))
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": sig(v for v in model.graph.input if v.name not in inits), "outputs": sig(model.graph.output)}


def keep_signature(pruned: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the pruned model the original's declared outputs (symbolic dims included): channels that
    reach an output are frozen, so the outputs are the same tensors; shape inference on the rewritten
    graph may only have resolved a symbolic dim the original declares (e.g. at a static input)."""
    if [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]:
        for dst, src in zip(pruned.graph.output, model.graph.output):
            if dst.type.tensor_type.elem_type == src.type.tensor_type.elem_type:
                dst.CopyFrom(src)
    return pruned
