"""Exporting an onnx-graphsurgeon graph to a ModelProto without holding its weights twice.

The lowest layer of the graph handling: tracer, runtime and rewriter all use it, and it imports none
of them (this breaks the import circle tracer -> runtime -> rewriter -> tracer)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def weightless(g: gs.Graph) -> list:
    """Give the weights of ``g`` (constants of WEIGHT_MIN_BYTES or more) weight-free values (an
    external-data stub with the same shape and type) so that exporting ``g`` copies no weights and
    the result can be serialized (also over 2 GB) for shape inference. Returns [(constant, values)]
    so the caller can put them back."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .io import WEIGHT_MIN_BYTES, _SKELETON_LOCATION

    swapped = []
    for t in g.tensors().values():
        if not isinstance(t, gs.Constant) or int(getattr(t._values, "nbytes", 0)) < WEIGHT_MIN_BYTES:
            continue
        try:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            if getattr(t, "export_dtype", t.dtype) != t.dtype:  # e.g. bfloat16 held as float32: gs converts
                continue
        except Exception:  # types numpy does not know: keep the values
            continue
        stub = onnx.TensorProto(name=t.name, dims=list(t.shape), data_location=onnx.TensorProto.EXTERNAL,
                                data_type=dtype)
        stub.external_data.add(key="location", value=_SKELETON_LOCATION)
        swapped.append((t, t._values))
        t._values = LazyValues(stub)
    return swapped


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a ModelProto with ``like``'s IR version, opsets and metadata.

    The weights are put into the proto one tensor at a time after export (gs.export_onnx would hold
    every initializer twice at once: its own TensorProtos and their copies in the graph)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .io import _SKELETON_LOCATION
    from .validate import _all_tensors

    graph.cleanup().toposort()
    stubbed = weightless(graph)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for t, values in stubbed:
            t._values = values
    weights = {t.name: values for t, values in stubbed}
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or not any(
                e.key == "location" and e.value == _SKELETON_LOCATION for e in tensor.external_data):
            continue
        values = weights.pop(tensor.name)  # KeyError: a stub that is not ours (a bug)
        name = tensor.name
        tensor.CopyFrom(values.tensor if isinstance(values, LazyValues)
                        else numpy_helper.from_array(np.asarray(values), name))
        tensor.name = name
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model
