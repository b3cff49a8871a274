"""Ops that move, select, pool or reshape channels without mixing them."""
from __future__ import annotations

import numpy as np

from .base import ChannelInfo, Rule, TraceState, across_channels, attr, input_or_none, norm_axis


def _int_list(st: TraceState, node, index: int, attr_name: str | None = None):
    """An int list given as a constant input (newer opsets) or an attribute (older ones)."""
    t = input_or_none(node, index)
    if t is not None:
        c = st.const(t)
        return None if c is None else [int(v) for v in c.reshape(-1)]
    if attr_name is not None and attr_name in node.attrs:
        return [int(v) for v in node.attrs[attr_name]]
    return []


def _static_ints(t, st: TraceState):
    """The value of a small integer tensor computed from shapes (Shape -> Gather -> Add/Div/Mul ->
    Unsqueeze/Concat, as the TorchScript exporter writes torch.chunk's bounds) when every size it
    reads is static at every input size (a traced channel width, a number shape inference wrote),
    else None. A list of ints."""
    v = _static_entries(t, st, 0)
    return None if v is None or any(x is None for x in v) else [int(x) for x in v]


def _static_entries(t, st: TraceState, depth: int):
    """_static_ints' walk: a list with None for an entry that is not static (a Shape's batch dim that
    a Gather may never read), or None when the computation is not followed."""
    c = st.const(t)
    if c is not None:
        return [int(x) for x in np.asarray(c).reshape(-1)]
    if depth > 16 or t is None or not getattr(t, "inputs", None):
        return None
    node = t.inputs[0]
    op = node.op

    def sub(i):
        return _static_entries(node.inputs[i], st, depth + 1)

    if op == "Shape":
        x = node.inputs[0]
        r, sym, xi = st.rank(x), st.sym_shape(x), st.info(x)
        if r is None:
            return None
        dims = []
        for k in range(r):
            if xi is not None and k == xi.axis:
                dims.append(len(xi))  # a traced channel axis: its width, the same at every input size
            elif sym is not None and k < len(sym) and isinstance(sym[k], int):
                dims.append(sym[k])  # a number shape inference wrote (not a symbol bound to the input size)
            else:
                dims.append(None)
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)
        return dims[slice(start, None if end is None else int(end))]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"):
        return sub(0)
    if op == "Concat":
        parts = [sub(i) for i in range(len(node.inputs))]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    if op == "Gather" and int(attr(node, "axis", 0)) == 0:
        data, idx = sub(0), sub(1)
        if data is None or idx is None or any(i is None or not -len(data) <= i < len(data) for i in idx):
            return None
        return [data[i] for i in idx]
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min") and len(node.inputs) == 2:
        x, y = sub(0), sub(1)
        if x is None or y is None or len(x) != len(y) and 1 not in (len(x), len(y)):
            return None
        n = max(len(x), len(y))
        out = []
        for a, b in zip(x * (n // len(x)), y * (n // len(y))):
            if a is None or b is None or op == "Div" and b == 0:
                out.append(None)
            elif op == "Div":  # integer division truncates toward zero
                out.append((abs(a) // abs(b)) * (1 if (a >= 0) == (b > 0) else -1))
            else:
                out.append({"Add": a + b, "Sub": a - b, "Mul": a * b, "Max": max(a, b), "Min": min(a, b)}[op])
        return out
    return None


class PassThroughRule(Rule):
    """Spatial ops: the channel axis (1) is untouched."""

    ops = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")

    # value maps: max pooling keeps a constant; average pooling keeps it unless padded zeros count
    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        if xi.axis != 1:
            return self.unknown(node, st, f"{node.op} over the channel axis")
        vals = xi.vals
        if node.op == "AveragePool" and attr(node, "count_include_pad", 0) and any(attr(node, "pads", [0])):
            vals = np.where(vals == 0, 0.0, np.nan)
        elif node.op in ("LpPool", "GlobalLpPool"):
            vals = np.where(vals == 0, 0.0, np.nan)
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return self.unknown(node, st, "MaxPool indices output is used")
        st.set(node.outputs[0], xi.with_vals(vals))


class ReduceRule(Rule):
    ops = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare",
           "ReduceProd", "ReduceLogSumExp", "ReduceLogSum")

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        axes = _int_list(st, node, 1, "axes")
        if r is None or axes is None:
            return self.unknown(node, st, f"{node.op} with unknown axes")
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                st.set(node.outputs[0], xi)
                return
            axes = list(range(r))
        axes = sorted(norm_axis(a, r) for a in axes)
        if xi.axis in axes:
            return self.unknown(node, st, across_channels(node.op))
        axis = xi.axis if attr(node, "keepdims", 1) else xi.axis - sum(a < xi.axis for a in axes)
        keeps = node.op in ("ReduceMean", "ReduceMax", "ReduceMin")
        vals = xi.vals if keeps else np.where(xi.vals == 0, 0.0, np.nan)
        st.set(node.outputs[0], ChannelInfo(axis, xi.ids, vals))


class ConcatRule(Rule):
    ops = ("Concat",)
    data_input_only = False

    def trace(self, node, st: TraceState) -> None:
        out_rank = st.rank(node.outputs[0])
        if out_rank is None:
            out_rank = next((st.rank(t) for t in node.inputs if st.rank(t) is not None), None)
        if out_rank is None:
            return self.unknown(node, st, "Concat of unknown rank")
        axis = norm_axis(attr(node, "axis"), out_rank)
        infos = [st.info(t) for t in node.inputs]
        ch_axes = {i.axis for i in infos if i is not None}
        if len(ch_axes) != 1:
            return self.unknown(node, st, "Concat of tensors with channels on different axes")
        ch = ch_axes.pop()
        if ch == axis:  # concatenating channels: offsets
            parts = []
            for t, info in zip(node.inputs, infos):
                if info is None:
                    shp = st.shape(t)
                    if shp is None or shp[axis] is None:
                        return self.unknown(node, st, "Concat with an input of unknown width")
                    info = ChannelInfo(axis, st.new_ids(shp[axis]))
                    st.freeze(info.ids, "channels concatenated from a non-traced tensor")
                parts.append(info)
            st.set(node.outputs[0], ChannelInfo(axis, np.concatenate([p.ids for p in parts]),
                                                np.concatenate([p.vals for p in parts])))
            return
        traced = [i for i in infos if i is not None]
        if len({len(i) for i in traced}) != 1:
            return self.unknown(node, st, "Concat along another axis of tensors with different channels")
        first = traced[0]
        for k, i in enumerate(infos):
            if i is None:  # a learned token (class token) concatenated along the tokens: sliced with them
                if not constant_channels(st, node, k, ch, first.ids):
                    return self.unknown(node, st, "Concat along the tokens of a tensor whose channels are "
                                                  "computed (not a constant class token)")
            else:
                st.union(first.ids, i.ids)
        vals = np.where(np.all([i.vals == first.vals for i in traced], axis=0) & (len(traced) == len(infos)),
                        first.vals, np.nan)
        st.set(node.outputs[0], first.with_vals(vals))


class SplitRule(Rule):
    ops = ("Split",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        if r is None:
            return self.unknown(node, st, "Split of unknown rank")
        axis = norm_axis(attr(node, "axis", 0), r)
        if axis != xi.axis:
            for o in node.outputs:
                st.set(o, xi)
            return
        sizes = _int_list(st, node, 1, "split")
        if sizes is None:
            return self.unknown(node, st, "Split with non-constant sizes")
        n_out = len(node.outputs)
        if not sizes:
            chunk = -(-len(xi) // n_out)
            sizes = [min(chunk, len(xi) - k * chunk) for k in range(n_out)]
        if sum(sizes) != len(xi) or len(sizes) != n_out:
            return self.unknown(node, st, "Split sizes do not match the channel count")
        offsets = np.cumsum([0] + sizes)
        for o, a, b in zip(node.outputs, offsets[:-1], offsets[1:]):
            st.set(o, xi.take(slice(a, b)))
        st.needs_rewrite(node, self, st.opset >= 13)  # sizes: an input from opset 13 on, else an attribute

    def rewrite(self, node, ctx, sizes_as_input) -> None:
        sizes = np.array([ctx.kept_count(ctx.info(o).ids) for o in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)  # kept widths need not be equal any more
        if not sizes_as_input:
            node.attrs["split"] = [int(s) for s in sizes]
            return
        if len(node.inputs) < 2:  # equal split without a sizes input: add one
            import onnx_graphsurgeon as gs

            node.inputs.append(gs.Variable.empty())
        ctx.set_input(node, 1, sizes)


class SliceRule(Rule):
    ops = ("Slice",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        if st.opset < 10:
            starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
        else:
            starts, ends = _int_list(st, node, 1), _int_list(st, node, 2)
            axes, steps = _int_list(st, node, 3), _int_list(st, node, 4)
        computed = None
        if st.opset >= 10 and (starts is None or ends is None) and axes is not None and steps is not None:
            # bounds computed from static shapes (torch.chunk through the TorchScript exporter:
            # (C + 1) // 2 * k): constant at every input size, so rewritten as constants
            s_val, e_val = _static_ints(node.inputs[1], st), _static_ints(node.inputs[2], st)
            if s_val is not None and e_val is not None and len(s_val) == len(e_val):
                starts, ends = s_val, e_val
                computed = (starts, ends)
        if r is None or starts is None or ends is None or axes is None or steps is None:
            return self.unknown(node, st, "Slice with non-constant bounds")
        axes = [norm_axis(a, r) for a in (axes or range(len(starts)))]
        steps = steps or [1] * len(starts)
        if xi.axis not in axes:
            st.set(node.outputs[0], xi)
            if computed is not None:  # they may read a channel count: keep the original values
                st.needs_rewrite(node, self, (None, 0, 0, computed))
            return
        k = axes.index(xi.axis)
        if steps[k] != 1:
            return self.unknown(node, st, "strided Slice on the channel axis")
        sel = slice(*slice(starts[k], ends[k], 1).indices(len(xi)))
        st.set(node.outputs[0], xi.take(sel))
        st.needs_rewrite(node, self, (k, sel.start, sel.stop, computed))

    def rewrite(self, node, ctx, data) -> None:
        k, a, b, computed = data
        if k is None:  # computed bounds on other axes, as constants
            for index in (1, 2):
                ctx.set_input(node, index, np.array(computed[index - 1], dtype=np.int64))
            return
        ids = ctx.info(node.inputs[0]).ids
        new_a = ctx.kept_count(ids[:a])
        new_b = new_a + ctx.kept_count(ids[a:b])
        for index, value in ((1, new_a), (2, new_b)):
            if computed is not None:  # the computed bounds become constants
                arr, dtype = np.array(computed[index - 1], dtype=np.int64), np.int64
            else:
                arr = np.array(np.asarray(node.inputs[index].values), dtype=np.int64).reshape(-1)
                dtype = node.inputs[index].values.dtype
            arr[k] = value
            ctx.set_input(node, index, arr.astype(dtype))


class TransposeRule(Rule):
    ops = ("Transpose",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        perm = attr(node, "perm", None)
        if perm is None:
            if r is None:
                return self.unknown(node, st, "Transpose of unknown rank")
            perm = list(range(r))[::-1]
        st.set(node.outputs[0], xi.with_axis(list(perm).index(xi.axis)))


class SqueezeRule(Rule):
    ops = ("Squeeze", "Unsqueeze")

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        axes = _int_list(st, node, 1, "axes")
        r_in, r_out = st.rank(node.inputs[0]), st.rank(node.outputs[0])
        if axes is None or r_in is None or (not axes and node.op == "Unsqueeze"):
            return self.unknown(node, st, f"{node.op} with unknown axes")
        if node.op == "Squeeze":
            if not axes:
                shp = st.shape(node.inputs[0])
                axes = [i for i, d in enumerate(shp) if d == 1]
            axes = [norm_axis(a, r_in) for a in axes]
            if xi.axis in axes:
                return self.unknown(node, st, "Squeeze of the channel axis")
            axis = xi.axis - sum(a < xi.axis for a in axes)
        else:
            r_out = r_in + len(axes)
            axes = sorted(norm_axis(a, r_out) for a in axes)
            axis = xi.axis
            for a in axes:
                if a <= axis:
                    axis += 1
        st.set(node.outputs[0], xi.with_axis(axis))


def _flatten_map(xi: ChannelInfo, in_shape, out_shape):
    """Where channel c of a row-major reshape lands: (out axis k, block size) or None if mixed.

    With `tail` = product of the (static) input dims after the channel axis, channel c occupies
    flat offsets [c*tail, (c+1)*tail) of every row; it stays whole iff some output axis k has
    size C*(tail/t) where t = product of the static output dims after k. Block size tail/t is 1
    when the channel axis survives, H*W for Flatten->Gemm; splitting C (channel shuffle) fails.
    """
    if in_shape is None or out_shape is None:
        return None
    post = in_shape[xi.axis + 1:]
    if any(d is None for d in post):
        return None
    tail = int(np.prod(post)) if post else 1
    t = 1
    for k in range(len(out_shape) - 1, -1, -1):
        if tail % t:
            return None
        if out_shape[k] == len(xi) * (tail // t):
            return k, tail // t
        if out_shape[k] is None:
            return None
        t *= out_shape[k]
    return None


def _shape_template(in_sym, out_sym, k: int):
    """Constant shape for the pruned Reshape: static dims kept, symbolic dims copied (0) where the
    input has the same symbol at the same position, one remaining symbolic dim as -1."""
    if in_sym is None or out_sym is None:
        return None
    tpl = []
    for i, d in enumerate(out_sym):
        if i == k or isinstance(d, int):
            tpl.append(d if isinstance(d, int) else 0)
        elif d is not None and i < len(in_sym) and in_sym[i] == d:
            tpl.append(0)
        else:
            tpl.append(-1)
    return tpl if tpl.count(-1) <= 1 else None


def _solve_one_dim(in_sym, out_sym):
    """Output shape with ints where known: an output dim shape inference left unknown (a computed
    target such as Concat(Shape(x)[0], -1)) is solved from the element count when it is the only
    unknown once the symbols shared by input and output cancel out."""
    if in_sym is None or out_sym is None or None in in_sym:
        return None
    rest = list(in_sym)
    out, unknown = [], []
    for i, d in enumerate(out_sym):
        if isinstance(d, str) and d in rest:
            rest.remove(d)
            out.append(None)
        elif isinstance(d, int):
            out.append(d)
        else:
            unknown.append(i)
            out.append(None)
    if len(unknown) == 1 and all(isinstance(d, int) for d in rest):
        known = int(np.prod([d for d in out if d is not None]))
        total = int(np.prod(rest))
        if known and total % known == 0:
            out[unknown[0]] = total // known
    return out


def _shape_elements(t, st: TraceState, depth: int = 0, host=None):
    """What each entry of a computed 1-D shape tensor is: ("dim", T, k) for dimension k of tensor T
    (read at run time through Shape), ("const", v), or None (computed otherwise). None when even the
    length is unknown. Follows the Shape -> Slice/Gather -> Concat/Unsqueeze/Cast arithmetic that
    exporters (paddle2onnx, the TorchScript exporter with dynamic axes) emit for sizes. ``host``
    (node name, input index) is where ``t`` is read; a constant entry then carries (node name,
    input index, flat index) of the constant holding it, or None where that constant is shared."""
    c = st.const(t)
    if c is not None:
        if c.ndim > 1:
            return None
        return [("const", int(v), None if host is None else (host[0], host[1], k))
                for k, v in enumerate(np.asarray(c).reshape(-1))]
    if depth > 16 or t is None or not getattr(t, "inputs", None):
        return None
    node = t.inputs[0]
    op = node.op
    # a constant below can be rewritten in place; when the shape computation is shared by several
    # consumers the tracer checks afterwards that all of them are Reshapes asking for the same value
    exclusive = host is not None

    def sub(i):
        return _shape_elements(node.inputs[i], st, depth + 1, (node.name, i) if exclusive else None)

    if op == "Shape":
        r = st.rank(node.inputs[0])
        if r is None:
            return None
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)
        dims = list(range(r))[slice(start, None if end is None else int(end))]
        return [("dim", node.inputs[0], k) for k in dims]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        inner = sub(0)
        return inner if inner is not None and len(inner) <= 1 or op in ("Cast", "Identity") else None
    if op == "Concat":
        out = []
        for i in range(len(node.inputs)):
            e = sub(i)
            if e is None:
                return None
            out.extend(e)
        return out
    if op == "Gather":
        e, idx = _shape_elements(node.inputs[0], st, depth + 1), st.const(node.inputs[1])
        e = None if e is None else [(x[0], x[1], None) if x is not None and x[0] == "const" else x for x in e]
        if e is None or idx is None or int(attr(node, "axis", 0)) != 0 or idx.ndim > 1:
            return None
        try:
            return [e[int(i)] for i in np.asarray(idx).reshape(-1)]
        except IndexError:
            return None
    if op == "Slice":
        e = _shape_elements(node.inputs[0], st, depth + 1)
        starts, ends = _int_list(st, node, 1, "starts"), _int_list(st, node, 2, "ends")
        axes = _int_list(st, node, 3, "axes") if input_or_none(node, 3) is not None or "axes" in node.attrs else [0]
        steps = _int_list(st, node, 4) if input_or_none(node, 4) is not None else [1]
        if e is None or not starts or not ends or axes not in ([0], [-1]) or steps != [1]:
            return None
        n = len(e)
        lo, hi = (max(-n, min(v, n)) for v in (starts[0], ends[0]))
        return e[slice(lo, hi)]
    if op == "Reshape":  # a scalar or 1-D shape piece reshaped to 1-D: same entries
        inner = sub(0)
        out_shape = st.shape(node.outputs[0])
        return inner if inner is not None and out_shape is not None and len(out_shape) <= 1 else None
    if op == "Mul" and len(node.inputs) == 2:  # a dim times a constant (B * heads): one entry each
        a_el, b_el = sub(0), sub(1)
        if a_el is not None and b_el is not None and len(a_el) == len(b_el) == 1:
            x, y = a_el[0], b_el[0]
            if y is not None and y[0] == "const" and x is not None and x[0] == "dim":
                return [("mul", x, y[1], y[2])]
            if x is not None and x[0] == "const" and y is not None and y[0] == "dim":
                return [("mul", y, x[1], x[2])]
    if op == "Equal" and len(node.inputs) == 2:  # torch's expand(-1) idiom: Where(Equal(s, -1), 1, s)
        a_el, b_el = (_shape_elements(x, st, depth + 1) for x in node.inputs)
        if a_el is None or b_el is None or len(a_el) != len(b_el) and 1 not in (len(a_el), len(b_el)):
            return None
        n = max(len(a_el), len(b_el))
        out = []
        for x, y in zip(a_el * (n // len(a_el)), b_el * (n // len(b_el))):
            kinds = (x[0] if x else None, y[0] if y else None)
            if kinds == ("const", "const"):
                out.append(("const", int(x[1] == y[1]), None))
            elif set(kinds) == {"dim", "const"} and (x if kinds[0] == "const" else y)[1] < 0:
                out.append(("const", 0, None))  # a size is never negative
            else:
                out.append(None)
        return out
    if op == "Where" and len(node.inputs) == 3:
        c_el, x_el, y_el = sub(0), sub(1), sub(2)
        if c_el is None or x_el is None or y_el is None or not len(c_el) == len(x_el) == len(y_el):
            return None
        return [None if c is None or c[0] != "const" else (x if c[1] else y) for c, x, y in zip(c_el, x_el, y_el)]
    if op in ("Mul", "Add", "Sub", "Div", "Floor", "Ceil", "Max", "Min"):  # same length, values computed
        lengths = [len(e) for e in (_shape_elements(x, st, depth + 1) for x in node.inputs) if e is not None]
        n = max(lengths) if lengths else None
        return None if n is None else [None] * n
    return None


def constant_channels(st: TraceState, node, index: int, axis: int, ids) -> bool:
    """Input ``index`` of ``node`` has ``len(ids)`` channels along its ``axis`` that come from one
    constant without mixing that axis (a class token ``Expand``-ed over the batch, a positional
    embedding ``Slice``-d or ``Gather``-ed along the tokens): make that constant a member sliced
    with ``ids`` (and record the channels of the tensors on the way, whose shapes the rewrite
    updates). False, changing nothing, when it is not such an input."""
    origin = _constant_origin(st, node, index, axis, len(ids), [])
    if origin is None:
        return False
    host, i, a, chain = origin
    st.member(host, i, a, ids, "param")
    for t, t_axis in chain:
        st.set(t, ChannelInfo(t_axis, ids))
    return True


def _constant_origin(st: TraceState, node, index: int, axis: int, n: int, chain: list):
    """(node, input index, axis, tensors on the way) of the constant behind input ``index`` of
    ``node``, see :func:`constant_channels`. Intermediate tensors must feed one node (slicing the
    constant changes what all their readers see); a constant is sliced per reading node, so
    sharing the constant itself is fine."""
    t = input_or_none(node, index)
    if t is None or axis < 0:
        return None
    c = st.const(t)
    if c is not None:
        return (node, index, axis, chain) if axis < c.ndim and c.shape[axis] == n else None
    r = st.rank(t)
    if len(chain) > 8 or r is None or not t.inputs or len(t.outputs) != 1:
        return None
    p = t.inputs[0]
    chain = [*chain, (t, axis)]
    if p.op in ("Identity", "Cast"):
        return _constant_origin(st, p, 0, axis, n, chain)
    if p.op == "Expand":
        elements = _shape_elements(p.inputs[1], st)
        r_in = st.rank(p.inputs[0])
        if elements is None or r_in is None:
            return None
        k = axis - (r - len(elements))
        if 0 <= k < len(elements) and (elements[k] is None or elements[k][0] != "const" or elements[k][1] != 1):
            return None  # the shape must broadcast the constant's channels, not name their count
        return _constant_origin(st, p, 0, axis - (r - r_in), n, chain)
    if p.op == "Slice":
        axes = _int_list(st, p, 3, "axes")
        if axes == [] and input_or_none(p, 3) is None and "axes" not in p.attrs:
            starts = _int_list(st, p, 1, "starts")
            axes = None if starts is None else list(range(len(starts)))
        if axes is None or axis in [norm_axis(a, r) for a in axes]:
            return None
        return _constant_origin(st, p, 0, axis, n, chain)
    if p.op == "Gather" and st.const(p.inputs[0]) is not None:
        data, idx_rank = st.const(p.inputs[0]), st.rank(p.inputs[1])
        g = norm_axis(int(attr(p, "axis", 0)), data.ndim)
        if idx_rank is None or g <= axis < g + idx_rank:
            return None
        a = axis if axis < g else axis - idx_rank + 1
        return (p, 0, a, chain) if data.shape[a] == n else None
    return None


def _same_channels(st: TraceState, t, xi: ChannelInfo, axis: int) -> bool:
    """Is dimension ``axis`` of ``t`` the channel axis of the channels ``xi`` describes?"""
    ti = st.info(t)
    return ti is not None and ti.axis == axis == xi.axis and len(ti.ids) == len(xi.ids) and \
        np.array_equal(ti.ids, xi.ids)


class ReshapeRule(Rule):
    """Reshape/Flatten that keep channels whole: [N,C,H,W]->[N,C*H*W] (a channel becomes a block of
    H*W features), [N,C,1,1]<->[N,C]; a channel shuffle's split (``_shuffle_split``), attention's
    head split (``_head_split``). Any other split of a channel axis freezes."""

    ops = ("Reshape", "Flatten")

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        in_shape, out_shape = st.shape(node.inputs[0]), st.shape(node.outputs[0])
        if node.op == "Reshape" and out_shape is not None and None in out_shape:
            out_shape = _solve_one_dim(st.sym_shape(node.inputs[0]), st.sym_shape(node.outputs[0]))
        if node.op == "Flatten" and in_shape is not None:
            ax = norm_axis(attr(node, "axis", 1), len(in_shape))
            head, tail = in_shape[:ax], in_shape[ax:]
            out_shape = [None if None in head else int(np.prod(head or [1])),
                         None if None in tail else int(np.prod(tail or [1]))]
        if node.op == "Reshape" and st.const(node.inputs[1]) is None and _copies_prefix(node, st, xi):
            # a shape computed at run time that copies the dims up to the channel axis from the input
            # itself (paddle2onnx: Concat(Shape(x)[0:2], [-1])): channel slices stay whole, and the
            # pruned width arrives through Shape; nothing to rewrite
            st.set(node.outputs[0], xi)
            return
        if node.op == "Reshape":
            fold = _fold_reshape(node, st, xi)
            if isinstance(fold, str):
                return self.unknown(node, st, fold)
            if fold is not None:
                axis, heads, where, folded = fold
                st.set(node.outputs[0], ChannelInfo(axis, heads, np.full(len(heads), np.nan)))
                if folded:
                    st.folded.add(node.outputs[0].name)
                if where is not None:
                    st.needs_rewrite(node, self, ("entry", where, heads, 1))
                return
            if node.inputs[0].name in st.folded:
                return self.unknown(node, st, "Reshape of channels folded into the batch axis")
            split = _shuffle_split(node, st, xi)
            if split is None:
                split = _head_split(node, st, xi)
            if isinstance(split, str):
                return self.unknown(node, st, split)
            if split is not None:
                axis, heads, where = split
                st.set(node.outputs[0], ChannelInfo(axis, heads, np.full(len(heads), np.nan)))
                if where is not None:
                    st.needs_rewrite(node, self, ("entry", where, heads, 1))
                return
        m = _flatten_map(xi, in_shape, out_shape)
        tpl = None
        if node.op == "Reshape" and st.const(node.inputs[1]) is None:
            # a computed target shape: keep it, rewrite only its channel entry (dims unknown
            # symbolically are compared at the model's input size)
            mc = m or _flatten_map(xi, st.cost_shape(node.inputs[0]), st.cost_shape(node.outputs[0]))
            where = None if mc is None else _computed_entry(node, st, mc[0], len(xi) * mc[1], np.repeat(xi.ids, mc[1]))
            if where is not None:
                axis, rep = mc
                st.set(node.outputs[0], ChannelInfo(axis, np.repeat(xi.ids, rep), np.repeat(xi.vals, rep)))
                if where != "free":
                    st.needs_rewrite(node, self, ("entry", where, xi.ids, rep))
                return
        if m is not None and node.op == "Reshape":
            tpl = _shape_template(st.sym_shape(node.inputs[0]), st.sym_shape(node.outputs[0]), m[0])
        if m is None or (node.op == "Reshape" and tpl is None):
            return self.unknown(node, st, f"{node.op} regroups the channel axis")
        axis, rep = m
        st.set(node.outputs[0], ChannelInfo(axis, np.repeat(xi.ids, rep), np.repeat(xi.vals, rep)))
        if node.op == "Reshape":
            st.needs_rewrite(node, self, (tpl, axis, rep))

    def rewrite(self, node, ctx, data) -> None:
        if data[0] == "entry":  # one constant entry of a (computed) shape: kept units x rep
            _, (host, index, flat), ids, rep = data
            target = node if host == node.name else _producer_named(node, host)
            old = np.asarray(target.inputs[index].values)
            new = old.copy().reshape(-1)
            new[flat] = ctx.kept_count(ids) * rep
            ctx.set_input(target, index, new.reshape(old.shape).astype(old.dtype))
            return
        tpl, axis, rep = data
        new = list(tpl)
        new[axis] = ctx.kept_count(ctx.info(node.inputs[0]).ids) * rep
        if 0 in new:
            node.attrs["allowzero"] = 0
        ctx.set_input(node, 1, np.array(new, dtype=np.int64))


def _producer_named(node, name: str):
    """The node called ``name`` among the producers of ``node``'s inputs (transitively)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for t in n.inputs:
            for p in getattr(t, "inputs", []):
                if p.name == name:
                    return p
                if id(p) not in seen:
                    seen.add(id(p))
                    stack.append(p)
    raise KeyError(name)


def _literal_zero(node, elements) -> bool:
    """allowzero=1 with a 0 entry: that 0 is a size, not "copy the input's dim" (the dynamo exporter
    sets allowzero on every Reshape; it only matters where an entry is 0)."""
    return bool(int(attr(node, "allowzero", 0))) and any(e is not None and e[0] == "const" and e[1] == 0
                                                          for e in elements)


def _reads_channels(st: TraceState, e) -> bool:
    """Does the shape entry ("dim", T, k) read a traced channel axis (whose size pruning changes)?"""
    ti = st.info(e[1])
    return ti is not None and ti.axis == e[2]


def _runtime_size(st: TraceState, e) -> bool:
    """Is the shape entry a size read at run time that pruning cannot change: a dim not read off
    traced channels, or such a dim times a constant (B*H)?"""
    if e is None:
        return False
    if e[0] == "mul":
        e = e[1]
    return e is not None and e[0] == "dim" and not _reads_channels(st, e)


def _stays_valid(st: TraceState, e, values) -> bool:
    """Does a computed shape's entry keep meaning the same size when channels shrink: a constant
    among ``values``, or a size read at run time (alone or times a constant) off an axis whose size
    pruning does not change?"""
    if e is None:
        return False
    return e[1] in values if e[0] == "const" else _runtime_size(st, e)


def _computed_entry(node, st: TraceState, k: int, width: int, ids=None):
    """For a Reshape whose target shape is computed: where its entry k (the channel axis, ``width``
    wide) is written, "free" when it is -1 or read at run time off a tensor whose channels are the
    same units as the output's (``ids``; a channel shuffle's merge reads the width of the tensor
    before the split): either way it follows the pruned width. None when the shape cannot be kept
    (another entry that is neither read off the input at run time nor a constant that stays valid)."""
    elements = _shape_elements(node.inputs[1], st, host=(node.name, 1))
    shp_out = st.cost_shape(node.outputs[0])
    if elements is None or shp_out is None or len(elements) != len(shp_out) or _literal_zero(node, elements):
        return None
    for i, e in enumerate(elements):
        if i == k:
            continue
        if not _stays_valid(st, e, (shp_out[i],)):
            return None
    e = elements[k]
    if e is not None and e[0] == "const" and e[1] == -1:
        return "free"
    if ids is not None and e is not None and e[0] == "dim" and _reads_channels(st, e):
        src = st.info(e[1])
        roots = [sorted(st.uf.find(int(i)) for i in x) for x in (src.ids, ids)]
        if len(src.ids) == width and roots[0] == roots[1]:
            return "free"
    if e is not None and e[0] == "const" and e[1] == width and e[2] is not None:
        return e[2]
    return None


def _fold_reshape(node, st: TraceState, xi: ChannelInfo):
    """Reshapes that fold attention heads into the batch axis or unfold them again (what
    nn.MultiheadAttention and the dynamo exporter's scaled_dot_product_attention emit):

    * split + fold: (T, B, C) -> (T, B*H, D), the entry B*H computed as Shape(x)[k] * H;
    * merge: (B, H, T, D) -> (-1, T, D), heads folded by a -1 that covers the axes up to them;
    * unfold: (B*H, T, D) -> (B, H, T, D), H a constant or read off a tensor with the same heads;
    * unfold + merge: (T, B*H, D) -> (T*B, H*D) (nn.MultiheadAttention with need_weights=True), see
      :func:`_merge_folded`.

    Returns (axis, head ids, where the head count is written or None, folded?), None when this is
    none of them, or a reason string to freeze."""
    elements = _shape_elements(node.inputs[1], st, host=(node.name, 1))
    shp_in, shp_out = st.cost_shape(node.inputs[0]), st.cost_shape(node.outputs[0])
    if (elements is None or not shp_in or not shp_out or None in shp_in or None in shp_out
            or len(elements) != len(shp_out) or _literal_zero(node, elements)):
        return None
    a = xi.axis

    def neutral(i, e) -> bool:  # an entry that pruning cannot change
        return e is not None and (e[0] == "dim" and not _reads_channels(st, e)
                                  or e[0] == "const" and e[1] in (shp_out[i], -1))

    if node.inputs[0].name in st.folded:  # unfold (B*H, ...) -> (B, H, ...)
        merged = _merge_folded(st, xi, elements, shp_in, shp_out)
        if merged is not None:
            return merged
        f, H = a, len(xi)
        if len(shp_out) != len(shp_in) + 1 or shp_out[:f] != shp_in[:f] or shp_out[f + 2:] != shp_in[f + 1:]:
            return "Reshape of channels folded into the batch axis"
        h_el = elements[f + 1]
        if shp_out[f + 1] != H or not all(neutral(i, e) for i, e in enumerate(elements) if i != f + 1):
            return "Reshape of channels folded into the batch axis"
        if h_el is not None and h_el[0] == "const" and h_el[1] == H and h_el[2] is not None:
            return f + 1, xi.ids, h_el[2], False
        if h_el is not None and h_el[0] == "dim" and _same_heads(st, h_el, xi):
            return f + 1, xi.ids, None, False
        return "Reshape unfolds heads with a count it cannot rewrite"
    C = len(xi)
    if len(shp_out) == len(shp_in) and a >= 1 and len(elements) > a:  # split + fold
        m_el, d_el = elements[a - 1], elements[a]
        if (m_el is not None and m_el[0] == "const" and m_el[1] == -1 and d_el is not None and d_el[0] == "const"
                and d_el[1] > 0 and C % d_el[1] == 0 and C // d_el[1] > 1):  # (T, -1, D): -1 is B*H
            D = int(d_el[1])
            H = C // D
            if (shp_out[a - 1] == shp_in[a - 1] * H and shp_out[a] == D
                    and all(neutral(i, e) and not (e[0] == "const" and e[1] == -1)
                            for i, e in enumerate(elements) if i not in (a - 1, a))):
                return a - 1, _one_unit_per_head(st, xi, H, D), None, True
        if (m_el is not None and m_el[0] == "mul" and d_el is not None and d_el[0] == "const"
                and m_el[1][0] == "dim" and not _reads_channels(st, m_el[1])):
            H, D = int(m_el[2]), int(d_el[1])
            if (H * D == C and H > 1 and shp_out[a - 1] == shp_in[a - 1] * H and shp_out[a] == D
                    and all(neutral(i, e) for i, e in enumerate(elements) if i not in (a - 1, a))):
                if m_el[3] is None:
                    return "Reshape folds heads with a count it cannot rewrite"
                return a - 1, _one_unit_per_head(st, xi, H, D), m_el[3], True
    if len(shp_out) == len(shp_in) - a and a >= 1:  # merge: -1 folds the axes up to the heads
        e0 = elements[0]
        if (e0 is not None and e0[0] == "const" and e0[1] == -1 and shp_out[0] == int(np.prod(shp_in[:a + 1]))
                and shp_out[1:] == shp_in[a + 1:] and all(neutral(i, e) for i, e in enumerate(elements) if i)):
            return 0, xi.ids, None, True
    return None


def _merge_folded(st: TraceState, xi: ChannelInfo, elements, shp_in, shp_out):
    """(..., B*H, D) -> (..., H*D): heads folded into the batch axis (its inner factor) merged with
    the head dim into the last axis, as nn.MultiheadAttention's need_weights=True path writes
    ``(T, B*H, D) -> (T*B, E)``: output channel h*D + d is channel d of head h, whatever the leading
    axes are. E must be a constant (rewritten to kept heads x D) or -1; every other entry must stay
    valid when heads go (a dim not read off traced channels, a constant, or such a dim x a constant).
    Returns like :func:`_fold_reshape` (the ids repeated D times), None when this is not such a
    merge, or a reason string."""
    f, H = xi.axis, len(xi)
    if len(shp_in) < 2 or f != len(shp_in) - 2 or len(shp_out) != len(shp_in) - 1:
        return None
    D = int(shp_in[-1])
    if shp_out[-1] != H * D or int(np.prod(shp_out[:-1])) * H != int(np.prod(shp_in[:-1])):
        return None
    c_el = elements[-1]
    free = c_el is not None and c_el[0] == "const" and c_el[1] == -1
    for i, e in enumerate(elements[:-1]):
        if _runtime_size(st, e) or e is not None and e[0] == "const" and (e[1] == shp_out[i] and e[1] > 0
                                                                           or e[1] == -1 and not free):
            continue
        return "Reshape merges heads folded into the batch axis with a dimension it cannot keep"
    if free:
        return len(shp_out) - 1, np.repeat(xi.ids, D), None, False
    if c_el is not None and c_el[0] == "const" and c_el[1] == H * D and c_el[2] is not None:
        return len(shp_out) - 1, np.repeat(xi.ids, D), c_el[2], False
    return "Reshape merges heads folded into the batch axis into a width it cannot rewrite"


def _one_unit_per_head(st: TraceState, xi: ChannelInfo, H: int, D: int) -> np.ndarray:
    """Join the D channels of each of the H heads into one unit; one id per head."""
    ids = xi.ids.reshape(H, D)
    for h in range(H):
        st.union(np.full(D - 1, ids[h, 0]), ids[h, 1:])
    return ids[:, 0].copy()


def _same_heads(st: TraceState, e, xi: ChannelInfo) -> bool:
    ti = st.info(e[1])
    return ti is not None and ti.axis == e[2] and len(ti.ids) == len(xi.ids) and all(
        st.uf.find(int(p)) == st.uf.find(int(q)) for p, q in zip(ti.ids, xi.ids))


def _heads_follow(node, depth: int = 0) -> bool:
    """Does the Reshape's output reach attention (MatMul, Attention, Einsum) through layout ops and
    scalings only, rather than being unpacked (Gather/Split/Squeeze/Unsqueeze/Slice: the q, k and v
    parts of a packed projection)? A split into 3 is heads then, not parts."""
    if depth > 6:
        return False
    consumers = [c for t in node.outputs for c in t.outputs]
    if not consumers:
        return False
    for c in consumers:
        if c.op in ("MatMul", "Attention", "Einsum", "Shape", "Size"):  # (Shape, Size: metadata only)
            continue
        if c.op in ("Transpose", "Reshape", "Identity", "Cast", "Mul", "Div") and _heads_follow(c, depth + 1):
            continue
        return False
    return True


def _head_split(node, st: TraceState, xi: ChannelInfo):
    """A Reshape that splits the channel axis into heads: C -> (H, D), or C -> (S, H, D) for packed
    q/k/v projections (timm, HF: (B, T, C) -> (B, T, H, D) / (B, T, 3, H, D)). Each head's D
    channels (of all S parts) become one unit; the output's channel axis is the H axis with one id
    per head. Returns (axis, head ids, where the head count is written or None when it is -1),
    None when this is not a head split, or a reason string to freeze."""
    a = xi.axis
    C = len(xi)
    shp_in, shp_out = st.cost_shape(node.inputs[0]), st.cost_shape(node.outputs[0])
    if not shp_in or not shp_out or None in shp_in or None in shp_out or len(shp_in) <= a:
        return None
    k = len(shp_out) - len(shp_in)
    if k not in (1, 2) or shp_out[:a] != shp_in[:a] or shp_out[a + k + 1:] != shp_in[a + 1:]:
        return None
    parts = shp_out[a:a + k + 1]
    if int(np.prod(parts)) != C:
        return None
    S, H, D = (1, *parts) if k == 1 else parts
    if H < 2 or D < 1:
        return None
    elements = _shape_elements(node.inputs[1], st, host=(node.name, 1))
    if elements is None or len(elements) != len(shp_out):
        return "Reshape splits the channel axis with a shape it cannot follow"
    h_el, d_el = elements[a + k - 1], elements[a + k]
    if _literal_zero(node, elements):
        return "Reshape with allowzero splits the channel axis"
    if k == 1 and H == 3 and not _heads_follow(node):
        # (T, B, 3C) -> (T, B, 3, C): q, k and v parts of a packed projection (nn.MultiheadAttention,
        # which selects the parts next); channel j of the three parts goes together, the parts stay.
        # Three heads of a separate projection (HF DeiT-Tiny: (B, T, 3, 64)) reach attention instead
        if h_el is None or h_el[0] != "const" or h_el[1] != 3:
            return "Reshape splits the channel axis into parts it cannot follow"
        for i, e in enumerate(elements):
            if i not in (a, a + 1) and not _stays_valid(st, e, (shp_out[i], 0, -1)):
                return "Reshape splits the channel axis with another computed dimension"
        if d_el is not None and d_el[0] == "const" and d_el[1] == -1:
            where = None
        elif d_el is not None and d_el[0] == "const" and d_el[1] == D and d_el[2] is not None:
            where = d_el[2]
        else:
            return "Reshape splits the channel axis into parts of a width it cannot rewrite"
        ids = xi.ids.reshape(3, D)
        st.union(ids[0], ids[1])
        st.union(ids[0], ids[2])
        return a + 1, ids[0].copy(), where
    if d_el is None or d_el[0] != "const" or d_el[1] != D:
        return "Reshape splits the channel axis without a constant head size"
    if k == 2 and (elements[a] is None or elements[a][0] != "const" or elements[a][1] != S):
        return "Reshape splits the channel axis without a constant part count"
    for i, e in enumerate(elements):  # every other entry must stay valid when C shrinks
        if i in (a + k - 1, a + k) or (k == 2 and i == a):
            continue
        if not _stays_valid(st, e, (shp_out[i], 0, -1)):
            return "Reshape splits the channel axis with another computed dimension"
    if h_el is not None and h_el[0] == "const" and h_el[1] == -1:
        where = None  # the head count follows the pruned width at run time
    elif h_el is not None and h_el[0] == "const" and h_el[1] == H and h_el[2] is not None:
        where = h_el[2]
    else:
        return "Reshape splits the channel axis with a head count it cannot rewrite"
    ids = xi.ids.reshape(S, H, D)
    for h in range(H):
        block = ids[:, h, :].reshape(-1)
        st.union(np.full(len(block) - 1, block[0]), block[1:])
    return a + k - 1, ids[0, :, 0].copy(), where


def _shuffle_split(node, st: TraceState, xi: ChannelInfo):
    """A channel shuffle (ShuffleNet; PyTorch, paddle2onnx and tf2onnx all emit it so): a Reshape
    that splits the channel axis a into (P, Q), a Transpose that swaps axes a and a+1 and nothing
    else, and a Reshape that merges them back. Channel p*Q + q of the input becomes channel q*P + p
    of the output, so a pruned shuffle stays a shuffle when position q goes from all P parts at once:
    those P channels become one unit, and the split's channel axis is the Q axis (one id per
    position), which the Transpose moves to a and the merging Reshape repeats P times
    (``_flatten_map``). Returns (axis, ids, where the width Q is written or None when it follows the
    pruned width at run time), None when this is not a shuffle, or a reason string to freeze."""
    a = xi.axis
    after = node.outputs[0].outputs
    if len(after) != 1 or after[0].op != "Transpose":
        return None
    transpose = after[0]
    shp_in, shp_out = st.cost_shape(node.inputs[0]), st.cost_shape(node.outputs[0])
    if not shp_in or not shp_out or None in shp_in or None in shp_out or len(shp_out) != len(shp_in) + 1:
        return None
    if list(shp_out[:a]) != list(shp_in[:a]) or list(shp_out[a + 2:]) != list(shp_in[a + 1:]):
        return None
    P, Q = shp_out[a], shp_out[a + 1]
    if P * Q != len(xi) or P < 2:
        return None
    perm = attr(transpose, "perm", None)
    swap = list(range(len(shp_out)))
    swap[a], swap[a + 1] = a + 1, a
    if perm is None or list(perm) != swap:
        return None
    merge = transpose.outputs[0].outputs
    if len(merge) != 1 or merge[0].op != "Reshape" or st.cost_shape(merge[0].outputs[0]) != list(shp_in):
        return None
    elements = _shape_elements(node.inputs[1], st, host=(node.name, 1))
    if elements is None or len(elements) != len(shp_out) or _literal_zero(node, elements):
        return "channel shuffle with a split shape it cannot follow"
    p_el, q_el = elements[a], elements[a + 1]
    if p_el is None or p_el[0] != "const" or p_el[1] != P:
        return "channel shuffle without a constant group count"
    for i, e in enumerate(elements):  # every other entry must stay valid when C shrinks
        if i in (a, a + 1):
            continue
        if not _stays_valid(st, e, (shp_out[i], 0, -1)):
            return "channel shuffle with another computed dimension"
    if q_el is not None and q_el[0] == "const" and q_el[1] == -1:
        where = None
    elif q_el is not None and q_el[0] == "const" and q_el[1] == Q and q_el[2] is not None:
        where = q_el[2]
    elif q_el is None and _channels_over(node, a + 1, st, xi, P):
        where = None  # C // P read off the input at run time (the TorchScript exporter): follows pruning
    else:
        return "channel shuffle with a group width it cannot rewrite"
    ids = xi.ids.reshape(P, Q)
    for p in range(1, P):
        st.union(ids[0], ids[p])
    return a + 1, ids[0].copy(), where


def _channels_over(node, k: int, st: TraceState, xi: ChannelInfo, P: int) -> bool:
    """Is entry k of the Reshape's computed shape (a Concat of one-entry pieces) the input's channel
    count divided by P at run time: Div(Shape(x)[a], P) through Cast/Unsqueeze/Identity?"""
    shape = node.inputs[1]
    cat = shape.inputs[0] if getattr(shape, "inputs", None) else None
    if cat is None or cat.op != "Concat" or int(attr(cat, "axis", 0)) != 0:
        return False
    at = 0
    for t in cat.inputs:
        el = _shape_elements(t, st)
        if el is None:
            return False
        if at == k and len(el) == 1:
            break
        at += len(el)
    else:
        return False
    while getattr(t, "inputs", None) and t.inputs[0].op in ("Cast", "Unsqueeze", "Identity", "Floor"):
        t = t.inputs[0].inputs[0]
    div = t.inputs[0] if getattr(t, "inputs", None) else None
    if div is None or div.op != "Div" or len(div.inputs) != 2:
        return False
    d = st.const(div.inputs[1])
    if d is None or np.asarray(d).size != 1 or int(np.asarray(d).reshape(-1)[0]) != P:
        return False
    num = _shape_elements(div.inputs[0], st)
    if num is None or len(num) != 1 or num[0] is None or num[0][0] != "dim" or num[0][2] != xi.axis:
        return False
    src = num[0][1]
    return src is node.inputs[0] or _same_channels(st, src, xi, xi.axis)


def _copies_prefix(node, st: TraceState, xi: ChannelInfo) -> bool:
    elements = _shape_elements(node.inputs[1], st)
    if elements is None or len(elements) <= xi.axis or _literal_zero(node, elements):
        return False
    for k in range(xi.axis + 1):
        e = elements[k]
        if e is None or e[0] != "dim" or e[2] != k or not (e[1] is node.inputs[0] or _same_channels(st, e[1], xi, k)
                                                            or k < xi.axis and e[1] is node.inputs[0]):
            return False
    return True


class PadRule(Rule):
    ops = ("Pad",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        pads = _int_list(st, node, 1, "pads")
        axes = _int_list(st, node, 3) if input_or_none(node, 3) is not None else None
        if pads is None or r is None:
            return self.unknown(node, st, "Pad with non-constant pads")
        axes = list(range(r)) if axes is None else [norm_axis(a, r) for a in axes]
        k = len(axes)
        if xi.axis in axes:
            j = axes.index(xi.axis)
            if pads[j] != 0 or pads[j + k] != 0:
                return self.unknown(node, st, "Pad along the channel axis")
        mode = attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        fill = 0.0
        cv = input_or_none(node, 2)
        if cv is not None:
            c = st.const(cv)
            fill = float(c.reshape(-1)[0]) if c is not None and c.size else np.nan
        elif "value" in node.attrs:
            fill = float(attr(node, "value"))
        vals = xi.vals if mode != "constant" else np.where(xi.vals == fill, xi.vals, np.nan)
        st.set(node.outputs[0], xi.with_vals(vals))


class ResizeRule(Rule):
    ops = ("Resize", "Upsample")

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        scales_idx, sizes_idx = (1, None) if node.op == "Upsample" else (2, 3)
        scales = input_or_none(node, scales_idx)
        sizes = input_or_none(node, sizes_idx) if sizes_idx else None
        ok = False
        if sizes is not None:
            s = st.const(sizes)
            ok = s is not None and len(s) == r and int(s[xi.axis]) == len(xi)
            if ok:
                st.needs_rewrite(node, self, xi.axis)
            elif s is None:  # sizes computed at run time: fine when the channel entry is read off the
                # input itself (or a tensor with the same channels) through Shape (paddle2onnx)
                e = _shape_elements(sizes, st)
                ch = e[xi.axis] if e is not None and len(e) == r else None
                ok = ch is not None and ch[0] == "dim" and ch[2] == xi.axis and (
                    ch[1] is node.inputs[0] or _same_channels(st, ch[1], xi, xi.axis))
        elif scales is not None:
            s = st.const(scales)
            ok = s is not None and s.size == r and float(s.reshape(-1)[xi.axis]) == 1.0
        elif node.op == "Upsample" and "scales" in node.attrs:
            ok = float(node.attrs["scales"][xi.axis]) == 1.0
        if not ok or attr(node, "axes", None) is not None:
            return self.unknown(node, st, f"{node.op} that may scale the channel axis")
        st.set(node.outputs[0], xi)  # interpolating a constant channel gives the same constant

    def rewrite(self, node, ctx, data) -> None:
        axis = data
        sizes = np.array(np.asarray(node.inputs[3].values), dtype=np.int64)
        sizes[axis] = ctx.kept_count(ctx.info(node.inputs[0]).ids)
        ctx.set_input(node, 3, sizes)


class ExpandRule(Rule):
    """Expand that broadcasts other axes and keeps the channel axis (the dynamo exporter's
    repeat_interleave of grouped-query k/v heads: (B, Hkv, 1, T, D) -> (B, Hkv, g, T, D), merged to
    (B, Hkv*g, T, D) by the Reshape after it). The shape's entry on the channel axis is 1 or -1
    (nothing to rewrite), a run-time size read off tensors with the same channels, or the channel
    count as a constant (rewritten to the kept count); every other entry must stay what it was when
    channels shrink. Anything else freezes."""

    ops = ("Expand",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r_in, r_out = st.rank(node.inputs[0]), st.rank(node.outputs[0])
        shp_out = st.cost_shape(node.outputs[0])
        elements = _shape_elements(node.inputs[1], st, host=(node.name, 1))
        if r_in is None or r_out is None or shp_out is None or elements is None or len(elements) != r_out:
            return self.unknown(node, st, "Expand with a shape it cannot follow")
        a = xi.axis + (r_out - r_in)
        if shp_out[a] != len(xi):
            return self.unknown(node, st, "Expand along the channel axis")
        for i, e in enumerate(elements):
            if i != a and not (e is not None and (e[0] == "const" or _runtime_size(st, e))):
                return self.unknown(node, st, "Expand with another computed dimension")
        e = elements[a]
        where = None
        if e is not None and e[0] == "dim" and _reads_channels(st, e):
            if not _same_channels(st, e[1], xi, e[2]):
                return self.unknown(node, st, "Expand whose shape reads another channel count")
        elif e is not None and e[0] == "const" and e[1] == len(xi) and len(xi) > 1:
            if e[2] is None:
                return self.unknown(node, st, "Expand with a shared channel count it cannot rewrite")
            where = e[2]
        elif not (e is not None and e[0] == "const" and e[1] in (1, -1)):
            return self.unknown(node, st, "Expand with a channel count it cannot rewrite")
        st.set(node.outputs[0], ChannelInfo(a, xi.ids, xi.vals))
        if where is not None:
            st.needs_rewrite(node, _ENTRY_REWRITE, ("entry", where, xi.ids, 1))


class GatherRule(Rule):
    """Gather along a non-channel axis with constant indices (``qkv[0]`` after the packed q/k/v
    reshape, a class token ``x[:, 0]``): channels pass, their axis shifts by the index rank."""

    ops = ("Gather",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        idx = st.const(node.inputs[1])
        if r is None or idx is None:
            return self.unknown(node, st, "Gather with computed indices")
        axis = norm_axis(int(attr(node, "axis", 0)), r)
        if axis == xi.axis:
            return self.unknown(node, st, "Gather along the channel axis")
        st.set(node.outputs[0], xi.with_axis(xi.axis if xi.axis < axis else xi.axis - 1 + idx.ndim))


class ShapeOnlyRule(Rule):
    """Shape/Size read metadata only; the result follows the pruned shape at run time and every
    op that uses it to build a channel-carrying tensor is checked by its own rule."""

    ops = ("Shape", "Size")

    def trace(self, node, st: TraceState) -> None:
        return None


_ENTRY_REWRITE = ReshapeRule()  # its "entry" rewrite (one constant entry of a shape) serves Expand too
RULES = [PassThroughRule(), ReduceRule(), ConcatRule(), SplitRule(), SliceRule(), TransposeRule(),
         SqueezeRule(), ReshapeRule(), PadRule(), ResizeRule(), GatherRule(), ShapeOnlyRule(), ExpandRule()]
