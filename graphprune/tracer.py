"""Trace an ONNX graph into groups of coupled channels."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import log
from .export import weightless
from .io import infer
from .rules import REGISTRY, SOURCE_OPS, Member, Source, TraceState
from .rules.base import DEFAULT_DOMAINS as _DEFAULT_DOMAINS
from .shapes import text as shapes_text

#: ops that typically sit in constant subgraphs computing shapes, pads or split sizes
_FOLDABLE_HINTS = frozenset({"Shape", "ConstantOfShape", "Gather", "Cast", "Range", "Size", "Expand", "Identity"})


@dataclass
class Group:
    """Channels that must be removed together. ``units[i]`` is the root id of the i-th removable
    unit (one channel, or one channel per conv group for grouped convolutions)."""

    id: int
    units: np.ndarray
    sources: list[Source]
    frozen: list[str] = field(default_factory=list)
    channels_per_unit: int = 1
    min_keep: int = 1  # units that always stay (at least one; 3 whole groups of a grouped conv)

    @property
    def prunable(self) -> bool:
        return not self.frozen and len(self.units) > self.min_keep

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class Trace:
    graph: gs.Graph
    state: TraceState
    roots: np.ndarray
    groups: list[Group]
    unit_gid: np.ndarray  # per root id: its group (-1 if none)
    unit_pos: np.ndarray  # per root id: its index within the group
    opset: int
    #: the size MACs were counted at and the checks run at: {input name: dims}, batch 1
    input_shapes: dict = field(default_factory=dict)

    @property
    def members(self) -> list[Member]:
        return self.state.members

    def locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """For an id array: (group id, unit index within the group) of each entry; -1 if none."""
        r = self.roots[np.asarray(ids, dtype=np.int64)]
        return self.unit_gid[r], self.unit_pos[r]

    def graph_node(self, name: str):
        if not hasattr(self, "_nodes"):
            self._nodes = {n.name: n for n in self.graph.nodes}
        return self._nodes[name]

    def kept_fn(self, removed_roots):
        keep = np.ones(len(self.roots), dtype=bool)
        removed = np.asarray(sorted(removed_roots), dtype=np.int64)
        if len(removed):
            keep[removed] = False
        return lambda ids: keep[self.roots[np.asarray(ids, dtype=np.int64)]]

    def removed_roots(self, plan: dict[int, np.ndarray]) -> set[int]:
        out: set[int] = set()
        for gid, positions in plan.items():
            out.update(int(r) for r in self.groups[gid].units[np.asarray(positions, dtype=np.int64)])
        return out


def _quiet_backends() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def to_graph(model: onnx.ModelProto, *, fold: bool = True, base=None) -> gs.Graph:
    """Import into onnx-graphsurgeon; fold constant subgraphs; give every node a unique name.

    Tensors of ``model`` that still refer to external data (``load_model(load_external=False)``) are
    read from their files under the folder ``base``, straight into the graph's arrays."""
    _quiet_backends()
    graph = gs.import_onnx(model)
    if base is not None:
        _read_external_constants(graph, base)
    if fold and any(n.op in _FOLDABLE_HINTS for n in graph.nodes):
        swapped: list = []
        try:
            graph.fold_constants(error_ok=True, flatten_subgraphs=False).cleanup()
            # re-import for the shapes of tensors whose shape was computed; the weights do not make
            # the round trip (stubs in the exported copy, the same values put back after import)
            swapped = weightless(graph)
            weights = {t.name: values for t, values in swapped}
            folded = gs.export_onnx(graph, do_type_check=False)
            folded.ir_version = model.ir_version
            del folded.opset_import[:]
            folded.opset_import.extend(model.opset_import)
            reimported = gs.import_onnx(infer(folded))
            for name, t in reimported.tensors().items():
                if name in weights and isinstance(t, gs.Constant):
                    t._values = weights[name]
            graph = reimported
        except Exception as exc:  # folding is an optimisation only: go on with the graph as folded
            for t, values in swapped:
                t._values = values
            log.warn(f"constant folding skipped ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    _dense_einsums(graph)
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}__gp"
        seen.add(node.name)
    graph.toposort()
    return graph


def _dense_einsum(equation: str, weight_ndim: int) -> bool | None:
    """For ``x, W`` with a 2-D W: None if the Einsum is not a dense layer over x's last axis, else
    whether W is stored (out, in) (``...i,oi->...o``) rather than (in, out) (``...i,io->...o``)."""
    eq = equation.replace(" ", "")
    if weight_ndim != 2 or "->" not in eq or eq.count(",") != 1 or "." in eq:
        return None
    lhs, out = eq.split("->")
    a, w = lhs.split(",")
    if len(w) != 2 or not a or len(set(a)) != len(a) or len(out) != len(a):
        return None
    c = a[-1]
    if c not in w or w[0] == w[1]:
        return None
    d = w[1] if w[0] == c else w[0]
    if d in a or out != a[:-1] + d:
        return None
    return w[1] == c


def _dense_einsums(graph: gs.Graph) -> None:
    """Rewrite dense Einsums (``bi,io->bo``, ``bhwc,cd->bhwd``, tf2onnx's Dense layers) with a
    constant 2-D weight as the equivalent MatMul, which every stage (channel rules, curvature,
    latency tables) knows; the weight is transposed once where stored (out, in)."""
    for node in graph.nodes:
        if node.op != "Einsum" or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1]
        transposed = _dense_einsum(str(node.attrs.get("equation", "")), len(w.shape))
        if transposed is None:
            continue
        if transposed:
            node.inputs[1] = gs.Constant(f"{w.name}__in_out", np.ascontiguousarray(np.asarray(w.values).T))
        node.op = "MatMul"
        node.attrs = {}


def _constants(graph: gs.Graph):
    """Every gs.Constant of ``graph`` and of its subgraphs (each once)."""
    seen: set[int] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                yield t
        for node in g.nodes:
            stack.extend(node.subgraphs())


def _read_external_constants(graph: gs.Graph, base) -> None:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .io import read_external
    from .validate import _WEIGHT_OPS

    weights = {t.name for n in graph.nodes if n.op in _WEIGHT_OPS for t in n.inputs[1:]}
    for t in _constants(graph):
        lazy = t._values
        if (isinstance(lazy, LazyValues) and isinstance(lazy.tensor, onnx.TensorProto)
                and lazy.tensor.data_location == onnx.TensorProto.EXTERNAL):
            t._values = read_external(lazy.tensor, base, str(base), is_weight=t.name in weights)
            # onnx-graphsurgeon re-exports a constant with the data_location it was imported with:
            # the values are in memory now (an export must not claim external data without a location)
            t.data_location = None


def detach_weights(model: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """Make ``graph`` the only holder of the weights: every constant still loading lazily from
    ``model`` gets its own array now; returns a weight-free skeleton of ``model`` (weights as
    external stubs) for the signature, opset and metadata. Drop ``model`` afterwards: the weights
    then exist once, in the graph."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .io import WEIGHT_MIN_BYTES, externalized

    for t in _constants(graph):
        if isinstance(t._values, LazyValues):
            t._values = t._values.load()
    return externalized(model, threshold=WEIGHT_MIN_BYTES)


def _implicit_inputs(node) -> set[str]:
    names: set[str] = set()
    for sub in node.subgraphs():
        local = {t.name for t in sub.inputs}
        for n in sub.nodes:
            local.update(t.name for t in n.outputs)
        for n in sub.nodes:
            names.update(t.name for t in n.inputs if t is not None and t.name not in local)
            names.update(_implicit_inputs(n))
    return names


def _default_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Set the default domain's opset; imports of other domains (com.microsoft, custom) stay, so
    shape inference and onnxruntime still accept their nodes."""
    others = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", opset), *others])
    return model


def _static_shapes(graph: gs.Graph, opset: int, input_shapes: dict) -> dict[str, list]:
    """Shapes at the model's input size, batch 1 (what MACs are counted on): shape inference with the
    inputs fixed at ``input_shapes`` (graphprune.shapes.resolve), or, where that leaves a layer's
    shape unknown, one onnxruntime run at that size."""
    g = graph.copy()
    for t in g.inputs:
        if t.name in input_shapes:
            t.shape = [int(d) for d in input_shapes[t.name]]
    heavy = weightless(g)  # infer on a copy without the weights
    try:
        model = _default_opset(gs.export_onnx(g, do_type_check=False), opset)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if not vi.type.tensor_type.HasField("shape"):  # no shape is not a scalar shape
            continue
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    wanted = [t.name for n in graph.nodes if n.op in SOURCE_OPS for t in (n.inputs[0], n.outputs[0])]
    # reshape targets computed at run time (heads folded into the batch axis: B*H) are what the
    # head rules compare sizes on
    wanted += [t.name for n in graph.nodes if n.op == "Reshape" for t in (n.inputs[0], n.outputs[0]) if t.name]
    if all(out.get(name) is not None and None not in out[name] for name in wanted):
        return out
    try:
        from .runtime import random_inputs, session

        if heavy:  # the measurement needs the real weights
            for t, values in heavy:
                t._values = values
            model = _default_opset(gs.export_onnx(g, do_type_check=False), opset)
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in have)
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, sess.run(None, random_inputs(model, batch=1, shapes=input_shapes))):
            out[name] = list(value.shape)
    except Exception as exc:
        log.warn(f"could not measure shapes at {shapes_text(input_shapes)} ({str(exc).splitlines()[0][:200] if str(exc) else exc!r}); "
                 "MACs of some layers count as 0")
    return out


def trace(graph: gs.Graph, opset: int, input_shapes: dict | None = None) -> Trace:
    """Trace ``graph``. ``input_shapes`` ({input: dims}, graphprune.shapes.resolve) is the size MACs
    are counted at; without it the graph's own dims serve (a dynamic non-batch dim is an error)."""
    from .shapes import resolve

    if input_shapes is None:
        input_shapes = resolve(graph)
    st = TraceState()
    st.opset = opset
    st.static_shapes = _static_shapes(graph, opset, input_shapes)
    st.batch = next((int(s[0]) for s in input_shapes.values() if len(s) > 1), 1)
    st.graph_outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        rule = REGISTRY.get(node.op) if node.domain in _DEFAULT_DOMAINS else None
        has_info = any(st.info(t) is not None for t in node.inputs)
        if list(node.subgraphs()):
            reason = f"control flow ({node.op})"
            st.freeze_inputs(node, reason)
            for name in _implicit_inputs(node):
                if name in st.infos:
                    st.freeze(st.infos[name].ids, reason)
            continue
        if rule is None:
            if has_info:
                st.freeze_inputs(node, _no_rule_reason(node))
            continue
        if not has_info and node.op not in SOURCE_OPS:
            continue
        if rule.data_input_only and node.op not in SOURCE_OPS and st.info(node.inputs[0]) is None:
            st.freeze_inputs(node, f"{node.op} reads channels through a non-data input")
            continue
        if rule.data_input_only and node.op not in SOURCE_OPS:
            for t in node.inputs[1:]:  # channels used as shapes, bounds, indices, ...
                info = st.info(t)
                if info is not None:
                    st.freeze(info.ids, f"{node.op} reads channels through a non-data input")
        folded = [t for t in node.inputs if t is not None and t.name in st.folded]
        if folded and not _fold_safe(node, st):
            st.freeze_inputs(node, f"{node.op} of channels folded into the batch axis")
            continue
        rule.trace(node, st)
        if folded and node.op != "Reshape":  # Transpose, scalar Mul, Softmax, MatMul keep the fold
            st.folded.update(t.name for t in node.outputs if st.info(t) is not None)
    from .rules.layers import contraction_macs

    for node in graph.nodes:  # Einsums that are not dense layers: counted at their full cost
        if node.op == "Einsum" and node.domain in _DEFAULT_DOMAINS:
            fixed = contraction_macs(st, node)
            if fixed:
                st.layer(node, fixed, None, 1, None, 1)
    _check_shared_shape_constants(graph, st)
    for out in graph.outputs:
        info = st.info(out)
        if info is not None:
            st.freeze(info.ids, f"reaches graph output {out.name!r}")
    # members are sliced constants; one that is computed at run time (e.g. a Conv bias fed by an
    # activation) cannot be sliced: keep its channels whole
    nodes = {n.name: n for n in graph.nodes}

    def constant(m) -> bool:
        return isinstance(nodes[m.node].inputs[m.input_index], gs.Constant)

    computed = [m for m in st.members if not constant(m)]
    for m in computed:
        st.freeze(m.ids, f"{m.tensor!r} is computed, not a constant")
    if computed:
        st.members[:] = [m for m in st.members if constant(m)]
    out = _build(graph, st, opset)
    out.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    return out


#: fused attention kernels: heads live inside one node whose weights and head count the channel
#: rules cannot slice (onnxruntime's transformer optimiser and some exporters write them)
_FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention",
                              "GroupQueryAttention", "DecoderAttention", "DecoderMaskedMultiHeadAttention",
                              "QAttention", "LongformerAttention", "SparseAttention", "RelativePositionBias",
                              "SkipLayerNormalization", "EmbedLayerNormalization"})


def _no_rule_reason(node) -> str:
    where = node.op if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op}"
    if node.op in _FUSED_ATTENTION and node.domain == "com.microsoft":
        return (f"fused {where} (heads and weights inside one kernel; prune the unfused export, "
                "before onnxruntime's transformer optimiser)")
    return f"no channel rule for {where}"


def _fold_safe(node, st) -> bool:
    """May ``node`` see a tensor whose channel axis is folded into the batch axis? Only ops that
    neither index nor broadcast per channel along that axis: Transpose, Softmax/Cast/Identity,
    MatMul of two folded operands, Mul/Div by a scalar or another folded tensor, and Reshape (its
    rule unfolds the axis or freezes)."""
    if node.op in ("Transpose", "Softmax", "Cast", "Identity", "Reshape"):
        return True
    with_info = [t for t in node.inputs if t is not None and st.info(t) is not None]
    if node.op == "MatMul":
        return all(t.name in st.folded for t in with_info)
    if node.op in ("Mul", "Div"):
        for t in node.inputs:
            if t is None or t.name in st.folded:
                continue
            c = st.const(t)
            if c is None or c.size != 1:
                return False
        return True
    return False


def _check_shared_shape_constants(graph: gs.Graph, st: TraceState) -> None:
    """Reshapes whose computed target shape gets one constant entry rewritten (head counts, merged
    widths) may share that computation (the dynamo exporter reuses one Concat for the q, k and v
    reshapes). Rewriting it in place is right only if every consumer of the shared computation is
    such a Reshape and all of them keep the same units; otherwise their channels freeze. Attention
    masks broadcast over the heads (rules/heads.py) are checked first; their head counts become 1,
    whatever is kept, so they form one group of their own."""
    from .rules.heads import check_mask_chains, drop_chains

    check_mask_chains(graph, st)
    by_host: dict[str, list] = {}
    for node, _rule, data in st.rewrites:
        if isinstance(data, tuple) and data and data[0] == "entry" and data[1][0] != node.name:
            # (a Reshape's own constant shape input is copied per node when rewritten: never shared)
            by_host.setdefault(data[1][0], []).append((node, data))
    if not by_host:
        return
    nodes = {n.name: n for n in graph.nodes}
    roots = st.uf.roots()
    failed_masks: dict[int, object] = {}
    for host, entries in by_host.items():
        if host not in nodes:
            continue
        asking = {node.name for node, _ in entries}
        # every node the host's outputs reach through shape arithmetic, up to the first non-shape use
        frontier, terminals, seen = list(nodes[host].outputs), set(), set()
        while frontier:
            t = frontier.pop()
            for c in t.outputs:
                if c.op in ("Reshape", "Expand") and len(c.inputs) > 1 and c.inputs[1] is t:
                    terminals.add(c.name)
                elif (c.op in ("Concat", "Unsqueeze", "Squeeze", "Cast", "Identity")
                      or c.op == "Reshape" and c.inputs[0] is t) and id(c) not in seen:  # shape arithmetic
                    seen.add(id(c))
                    frontier.extend(c.outputs)
                else:
                    terminals.add(f"{c.op}:{c.name}")
        if terminals - asking:
            for _, d in entries:
                st.freeze(np.asarray(d[2]), "a shape computation shared with other tensors carries the channel count")
                if len(d) > 4:  # a mask chain: none of its constants may change now
                    failed_masks[id(d[4])] = d[4]
            continue
        # the value each Reshape writes: kept units (by root) x rep
        by_units: dict[tuple, list] = {}
        for node, d in entries:
            key = ("mask",) if len(d) > 4 else tuple(roots[np.asarray(d[2])].tolist()) + (d[3],)
            by_units.setdefault(key, []).append((node, d))
        # Reshapes of different channel groups (heads of two layers) share it: every further group
        # gets one copy of the computation, from the host down, shared by that group's Reshapes
        for k, group in enumerate(list(by_units.values())[1:], start=1):
            copies: dict[int, object] = {}  # original shape tensor -> its copy
            for node, d in group:
                shape_in = node.inputs[1]
                if id(shape_in) in copies:
                    node.inputs[1], new_host = copies[id(shape_in)]
                else:
                    new_host = _privatize_shape(graph, node, host, f"__gp_s{k}_{len(copies)}")
                    copies[id(shape_in)] = (node.inputs[1], new_host)
                i = next(j for j, (n, _r, dd) in enumerate(st.rewrites) if n is node and dd is d)
                st.rewrites[i] = (node, st.rewrites[i][1], (d[0], (new_host, *d[1][1:]), *d[2:]))
        if len(by_units) > 1:
            graph.toposort()
    drop_chains(st, list(failed_masks.values()), "a shape computation shared with other tensors carries the channel count")


def _privatize_shape(graph: gs.Graph, reshape, host: str, tag: str) -> str:
    """Give ``reshape`` its own copy of the nodes between ``host`` (included) and its shape input;
    returns the copied host's name. Constants and tensors that do not depend on ``host`` stay shared."""
    depends: dict[int, bool] = {}

    def dep(node) -> bool:
        if id(node) not in depends:
            depends[id(node)] = node.name == host or any(dep(t.inputs[0]) for t in node.inputs
                                                         if t is not None and t.inputs)
        return depends[id(node)]

    clones: dict[int, gs.Node] = {}

    def copy(t):
        if t is None or not t.inputs or not dep(t.inputs[0]):
            return t
        p = t.inputs[0]
        if id(p) not in clones:
            ins = [copy(x) for x in p.inputs]
            outs = [gs.Variable(f"{o.name}{tag}", dtype=o.dtype, shape=o.shape) for o in p.outputs]
            q = gs.Node(p.op, f"{p.name}{tag}", dict(p.attrs), ins, outs, domain=p.domain)
            graph.nodes.append(q)
            clones[id(p)] = q
        return clones[id(p)].outputs[p.outputs.index(t)]

    reshape.inputs[1] = copy(reshape.inputs[1])
    return f"{host}{tag}"


def _build(graph: gs.Graph, st: TraceState, opset: int) -> Trace:
    roots = st.uf.roots()
    frozen: dict[int, list[str]] = {}
    for ids, reason in st.frozen:
        for r in np.unique(roots[ids]).tolist():
            frozen.setdefault(r, [])
            if reason not in frozen[r]:
                frozen[r].append(reason)
    # sources sharing a unit (residual sums, concat-then-add, ...) form one group
    parent = list(range(len(st.sources)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for si, src in enumerate(st.sources):
        for r in np.unique(roots[src.ids]).tolist():
            if r in owner:
                a, b = find(owner[r]), find(si)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[r] = si
    by_comp: dict[int, list[int]] = {}
    for si in range(len(st.sources)):
        by_comp.setdefault(find(si), []).append(si)
    groups: list[Group] = []
    position: dict[int, tuple[int, int]] = {}
    for comp in sorted(by_comp.values(), key=lambda c: c[0]):
        gid = len(groups)
        units: list[int] = []
        for si in comp:
            for r in roots[st.sources[si].ids].tolist():
                if r not in position:
                    position[r] = (gid, len(units))
                    units.append(r)
        reasons: list[str] = []
        for r in units:
            for reason in frozen.get(r, []):
                if reason not in reasons:
                    reasons.append(reason)
        first = st.sources[comp[0]].ids
        per_unit = max(1, len(first) // max(1, len(np.unique(roots[first]))))
        groups.append(Group(gid, np.asarray(units, dtype=np.int64), [st.sources[si] for si in comp], reasons,
                            per_unit))
    unit_gid = np.full(len(roots), -1, dtype=np.int64)
    unit_pos = np.full(len(roots), -1, dtype=np.int64)
    for r, (gid, pos) in position.items():
        unit_gid[r], unit_pos[r] = gid, pos
    for ids, n in st.min_units:
        for gid in np.unique(unit_gid[roots[ids]]).tolist():
            if gid >= 0:
                groups[gid].min_keep = max(groups[gid].min_keep, n)
    return Trace(graph, st, roots, groups, unit_gid, unit_pos, opset)
