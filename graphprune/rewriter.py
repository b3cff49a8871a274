"""Apply a plan: slice member initializers, fix shape constants and attributes, export.

The same constant-editing pass builds the *masked original* used for verification (removed
channels zeroed where a layer consumes them) so the two can never disagree on which slices
belong to a channel.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .rules import RewriteContext
from .export import export_graph  # noqa: F401  (re-exported: callers import it from here)
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


def apply_plan(trace: Trace, removed_roots, like: onnx.ModelProto) -> onnx.ModelProto:
    """Physically remove the units in ``removed_roots`` from a copy of the traced graph."""
    graph = trace.graph.copy()
    keep = trace.kept_fn(removed_roots)
    edit_constants(graph, member_edits(trace, keep), "slice")
    nodes = {n.name: n for n in graph.nodes}
    counter = [0]

    def set_input(node, index: int, values: np.ndarray) -> None:
        counter[0] += 1
        # np.array, not np.ascontiguousarray: the latter turns a scalar (0-d) constant into shape (1,)
        node.inputs[index] = gs.Constant(f"{node.name}__gp_in{index}_{counter[0]}", np.array(values, order="C"))

    ctx = RewriteContext(trace.state.infos, keep, set_input)
    for node, rule, data in trace.state.rewrites:
        rule.rewrite(nodes[node.name], ctx, data)
    tensors = graph.tensors()
    for name, info in trace.state.infos.items():
        t = tensors.get(name)
        if isinstance(t, gs.Variable) and t.shape is not None and info.axis < len(t.shape):
            shape = list(t.shape)
            # an axis holding batch x heads (heads folded into the batch axis) has no fixed size
            shape[info.axis] = None if name in trace.state.folded else int(keep(info.ids).sum())
            t.shape = shape
    model = export_graph(graph, like)
    for t in graph.tensors().values():  # the sliced arrays now live in ``model``: free them now, not
        if isinstance(t, gs.Constant):  # whenever the garbage collector breaks the graph's cycles
            t._values = None
    return model


@contextmanager
def masked_view(trace: Trace, removed_roots, like: onnx.ModelProto):
    """The original model with removed channels zeroed where layers consume them, as a GraphModel.

    The zeros are written into the trace graph's own arrays and the overwritten values put back on
    exit (even on error), so the check costs the removed slices, not a second copy of the weights.
    An array that is shared with another constant, or read-only, is copied for the duration instead."""
    from .runtime import GraphModel

    edits = member_edits(trace, trace.kept_fn(removed_roots), roles=("in",))
    for node_name, i in edits:  # lazily loaded values: load them into the trace graph, once
        trace.graph_node(node_name).inputs[i].values
    graph = trace.graph.copy()  # new tensor objects sharing the trace graph's arrays
    nodes = {n.name: n for n in graph.nodes}
    uses: dict[str, list] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant):
                uses.setdefault(t.name, []).append((node.name, i))
    owners: dict[int, int] = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray):
            base = t._values.base if t._values.base is not None else t._values
            owners[id(base)] = owners.get(id(base), 0) + 1
    saved: list[tuple[np.ndarray, tuple, np.ndarray]] = []
    try:
        for name in {nodes[n].inputs[i].name for n, i in edits}:
            specs = {edits.get(use, ()) for use in uses[name]}
            tensor = nodes[uses[name][0][0]].inputs[uses[name][0][1]]
            values = tensor._values if isinstance(tensor._values, np.ndarray) else None
            shared = values is None or owners.get(id(values.base if values.base is not None else values), 0) > 1
            if len(specs) != 1 or shared or not values.flags.writeable or not values.flags.c_contiguous:
                edit_constants(graph, {use: edits[use] for use in uses[name] if use in edits}, "zero")
                continue
            for axis, mask_bytes, n in specs.pop():
                mask = np.frombuffer(mask_bytes, dtype=bool)[:n]
                index = [slice(None)] * values.ndim
                index[axis] = np.nonzero(~mask)[0]
                index = tuple(index)
                saved.append((values, index, values[index].copy()))
                values[index] = 0
        yield GraphModel(graph, like)
    finally:
        for values, index, old in reversed(saved):
            values[index] = old


def masked_original(trace: Trace, removed_roots, like: onnx.ModelProto) -> onnx.ModelProto:
    """The masked original as a self-contained ModelProto (a copy of every zeroed weight); for tools
    and tests that want a file. Verification uses :func:`masked_view`."""
    graph = trace.graph.copy()
    edit_constants(graph, member_edits(trace, trace.kept_fn(removed_roots), roles=("in",)), "zero")
    return export_graph(graph, like)


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    return copy.deepcopy(model)


def expanded_pruned(trace: Trace, removed_roots, pruned: onnx.ModelProto, like: onnx.ModelProto):
    """The original graph carrying the *pruned model's* weights scattered back to their original
    positions (zeros where channels were removed), then masked. Equal to the pruned model iff the
    channel structure of the rewrite is right, whatever compensation did to the kept weights.
    Returned as a GraphModel (its arrays are new, but no serialized copy is made)."""
    from onnx import numpy_helper

    from .runtime import GraphModel

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
    return GraphModel(graph, like)


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
