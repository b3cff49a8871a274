"""Apply a plan: slice member initializers, fix shape constants and attributes, export.

The same constant-editing pass builds the *masked original* used for verification (removed
channels zeroed where a layer consumes them) so the two can never disagree on which slices
belong to a channel.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .rules import RewriteContext
from .tracer import Trace

# an edit of one constant use: ((axis, mask bytes), ...) with op "slice" or "zero"
EditSpec = tuple


def _apply_spec(values: np.ndarray, op: str, spec: EditSpec) -> np.ndarray:
    out = np.asarray(values)
    for axis, mask_bytes, n in spec:
        mask = np.frombuffer(mask_bytes, dtype=bool)[:n]
        if op == "slice":
            out = np.compress(mask, out, axis=axis)
        else:
            out = out.copy()
            index = [slice(None)] * out.ndim
            index[axis] = ~mask
            out[tuple(index)] = 0
    return np.ascontiguousarray(out)


def edit_constants(graph: gs.Graph, edits: dict[tuple[str, int], EditSpec], op: str) -> None:
    """Apply per-use edits; a constant shared by uses that need different edits is copied per use."""
    nodes = {n.name: n for n in graph.nodes}
    by_tensor: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                by_tensor.setdefault(t.name, []).append((node, i))
    touched = {nodes[n].inputs[i].name for n, i in edits}
    for name in touched:
        uses = by_tensor[name]
        specs = {(n.name, i): edits.get((n.name, i), ()) for n, i in uses}
        tensor = uses[0][0].inputs[uses[0][1]]
        distinct = set(specs.values())
        if len(distinct) == 1:
            tensor.values = _apply_spec(tensor.values, op, distinct.pop())
            continue
        made: dict[EditSpec, gs.Constant] = {}
        for (node_name, i), spec in specs.items():
            if not spec:
                continue
            if spec not in made:
                made[spec] = gs.Constant(f"{name}__gp{len(made)}", _apply_spec(tensor.values, op, spec))
            nodes[node_name].inputs[i] = made[spec]


def member_edits(trace: Trace, keep_fn, roles=None) -> dict[tuple[str, int], EditSpec]:
    """Per (node, input) use: the kept mask of every member axis (only where something is removed)."""
    edits: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for m in trace.members:
        if roles is not None and m.role not in roles:
            continue
        mask = keep_fn(m.ids)
        if mask.all():
            continue
        per_axis = edits.setdefault((m.node, m.input_index), {})
        per_axis[m.axis] = mask if m.axis not in per_axis else per_axis[m.axis] & mask
    return {k: tuple((ax, mk.tobytes(), len(mk))
                     for ax, mk in sorted(v.items(), reverse=True))
            for k, v in edits.items()}


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def apply_plan(trace: Trace, removed_roots, like: onnx.ModelProto) -> onnx.ModelProto:
    """Physically remove the units in ``removed_roots`` from a copy of the traced graph."""
    graph = trace.graph.copy()
    keep = trace.kept_fn(removed_roots)
    edit_constants(graph, member_edits(trace, keep), "slice")
    nodes = {n.name: n for n in graph.nodes}
    counter = [0]

    def set_input(node, index: int, values: np.ndarray) -> None:
        counter[0] += 1
        node.inputs[index] = gs.Constant(f"{node.name}__gp_in{index}_{counter[0]}", np.ascontiguousarray(values))

    ctx = RewriteContext(trace.state.infos, keep, set_input)
    for node, rule, data in trace.state.rewrites:
        rule.rewrite(nodes[node.name], ctx, data)
    tensors = graph.tensors()
    for name, info in trace.state.infos.items():
        t = tensors.get(name)
        if isinstance(t, gs.Variable) and t.shape is not None and info.axis < len(t.shape):
            shape = list(t.shape)
            shape[info.axis] = int(keep(info.ids).sum())
            t.shape = shape
    return export_graph(graph, like)


def masked_original(trace: Trace, removed_roots, like: onnx.ModelProto) -> onnx.ModelProto:
    """The original model with removed channels zeroed where layers consume them."""
    graph = trace.graph.copy()
    edit_constants(graph, member_edits(trace, trace.kept_fn(removed_roots), roles=("in",)), "zero")
    return export_graph(graph, like)


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    return copy.deepcopy(model)


def expanded_pruned(trace: Trace, removed_roots, pruned: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """The original graph carrying the *pruned model's* weights scattered back to their original
    positions (zeros where channels were removed), then masked. Equal to the pruned model iff the
    channel structure of the rewrite is right, whatever compensation did to the kept weights."""
    from onnx import numpy_helper

    graph = trace.graph.copy()
    keep = trace.kept_fn(removed_roots)
    masks: dict[str, dict[int, np.ndarray]] = {}
    for m in trace.members:
        per = masks.setdefault(m.tensor, {})
        mk = keep(m.ids)
        per[m.axis] = mk if m.axis not in per else per[m.axis] & mk
    values = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Constant) or name not in values:
            continue
        orig = np.asarray(t.values)
        per = masks.get(name, {})
        index = tuple(np.nonzero(per[ax])[0] if ax in per else np.arange(d) for ax, d in enumerate(orig.shape))
        kept_shape = tuple(len(i) for i in index)
        new = values[name]
        if new.shape == orig.shape and not per:
            t.values = new.astype(orig.dtype)
        elif new.shape == kept_shape:
            full = np.zeros_like(orig)
            full[np.ix_(*index)] = new
            t.values = full
    edit_constants(graph, member_edits(trace, keep, roles=("in",)), "zero")
    return export_graph(graph, like)


def sliced_mismatches(trace: Trace, removed_roots, pruned: onnx.ModelProto, skip=()) -> list[str]:
    """Initializers of PRUNED that are not exactly the original's slice for this removal (tensors in
    ``skip``, e.g. those weight compensation rewrote, are not compared)."""
    from onnx import numpy_helper

    keep = trace.kept_fn(removed_roots)
    specs = member_edits(trace, keep)
    by_tensor: dict[str, set] = {}
    for (node, index), spec in specs.items():
        by_tensor.setdefault(trace.graph_node(node).inputs[index].name, set()).add(spec)
    pruned_values = {i.name: i for i in pruned.graph.initializer}
    bad = []
    for name, found in by_tensor.items():
        if name in skip or name not in pruned_values or len(found) != 1:
            continue
        expected = _apply_spec(trace.graph.tensors()[name].values, "slice", next(iter(found)))
        if not np.array_equal(numpy_helper.to_array(pruned_values[name]), expected):
            bad.append(name)
    return bad
