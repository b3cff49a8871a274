"""Contraction layers: they create new channels (sources) and consume channels ("in" members)."""
from __future__ import annotations

import numpy as np

from .base import ChannelInfo, Rule, TraceState, attr, input_or_none, uniform_along, zero_rows


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims)) if len(dims) else 1


def _per_sample(st: TraceState, shape) -> int:
    """How many images per model sample the leading axis of ``shape`` holds (1, or e.g. windows/
    frames folded into the batch axis), from the shapes at the model's input size."""
    if not shape or not isinstance(shape[0], (int, np.integer)) or shape[0] < 1:
        return 1
    return max(1, int(shape[0]) // max(st.batch, 1))


def _bias_vals(st: TraceState, node, index: int, zero: np.ndarray, tile: int = 1) -> np.ndarray:
    """Output value of channels whose weights are all zero: the bias (or 0); NaN elsewhere."""
    b = input_or_none(node, index)
    bias = st.const(b) if b is not None else None
    base = np.zeros(len(zero)) if bias is None else np.broadcast_to(bias.astype(np.float64).reshape(-1), zero.shape)
    return np.where(zero, base, np.nan)


def _input_info(st: TraceState, node, axis: int, reason: str):
    xi = st.info(node.inputs[0])
    if xi is not None and xi.axis != axis:
        st.freeze(xi.ids, reason)
        return None
    return xi


class ConvRule(Rule):
    ops = ("Conv",)

    def trace(self, node, st: TraceState) -> None:
        w = st.const(node.inputs[1])
        if w is None:
            return self.unknown(node, st, "Conv with a non-constant weight")
        y = node.outputs[0]
        xi = _input_info(st, node, 1, "Conv reads channels on a non-channel axis")
        g = int(attr(node, "group", 1))
        m, cg = w.shape[0], w.shape[1]
        out_shape = st.cost_shape(y)
        sp = _prod(out_shape[2:]) if out_shape else None
        coef = (sp or 0) * int(np.prod(w.shape[2:])) * _per_sample(st, out_shape)
        has_b = input_or_none(node, 2) is not None
        zero = zero_rows(w, 0)
        if g == 1:
            if xi is not None:
                st.member(node, 1, 1, xi.ids, "in", xi.vals)
            out = st.source(node, y, 1, m, _bias_vals(st, node, 2, zero))
            st.member(node, 1, 0, out.ids, "out")
            if has_b:
                st.member(node, 2, 0, out.ids, "bias")
            st.layer(node, coef, out.ids, m, None if xi is None else xi.ids, cg)
        elif cg == 1 and m % g == 0 and xi is not None and len(xi) == g:
            # depthwise (channel multiplier k): output channel o depends on input channel o // k only
            k = m // g
            ids = np.repeat(xi.ids, k)
            vals = np.where(np.repeat(xi.vals == 0, k) | zero, _bias_vals(st, node, 2, np.ones(m, bool)), np.nan)
            st.set(y, xi.take(np.repeat(np.arange(g), k)).with_vals(vals))
            st.member(node, 1, 0, ids, "param")
            if has_b:
                st.member(node, 2, 0, ids, "param")
            st.layer(node, coef, ids, m, None, 1)
            st.needs_rewrite(node, self)
        elif g >= 3 and xi is not None and len(xi) == cg * g and m % g == 0:
            # grouped conv with a cardinality (ResNeXt, RegNet): a unit is one whole conv group, its
            # cg input and m/g output channels; the kept groups are re-packed and ``group`` becomes
            # their count. (Tiles, the same index of every group, would cut each group to a sliver:
            # the held-out RegNet-SE collapsed at 1 of 8 channels per group.)
            groups_in = xi.ids.reshape(g, cg)
            for gi in range(g):
                st.union(np.full(cg - 1, groups_in[gi, 0]), groups_in[gi, 1:])
            out_ids = np.repeat(groups_in[:, 0], m // g)
            st.set(y, ChannelInfo(1, out_ids))
            st.member(node, 1, 0, out_ids, "param")
            if has_b:
                st.member(node, 2, 0, out_ids, "param")
            st.layer(node, coef, out_ids, m, None, cg)
            st.needs_rewrite(node, self, cg)
            st.keep_at_least(groups_in[:, 0], 3)  # stays a conv of whole groups when traced again
        else:  # two groups (a merge of two branches), or an input that is not traced: tiles
            if xi is not None:
                if len(xi) != cg * g:
                    return self.unknown(node, st, "Conv input width does not match its weight")
                tiles = xi.ids.reshape(g, cg)
                for gi in range(1, g):
                    st.union(tiles[0], tiles[gi])
                st.member(node, 1, 1, tiles[0], "in", xi.vals[:cg])
            out = st.source(node, y, 1, m // g, _bias_vals(st, node, 2, zero), tile=g)
            st.member(node, 1, 0, out.ids, "out")
            if has_b:
                st.member(node, 2, 0, out.ids, "bias")
            st.layer(node, coef, out.ids, m, None if xi is None else xi.ids[:cg], cg)

    def rewrite(self, node, ctx, data) -> None:
        """``group`` = kept input channels / channels per group (depthwise: 1; whole groups: cg)."""
        xi = ctx.info(node.inputs[0])
        node.attrs["group"] = ctx.kept_count(xi.ids) // (data or 1)


class ConvTransposeRule(Rule):
    ops = ("ConvTranspose",)

    def trace(self, node, st: TraceState) -> None:
        w = st.const(node.inputs[1])
        if w is None:
            return self.unknown(node, st, "ConvTranspose with a non-constant weight")
        y = node.outputs[0]
        xi = _input_info(st, node, 1, "ConvTranspose reads channels on a non-channel axis")
        g = int(attr(node, "group", 1))
        c, mg = w.shape[0], w.shape[1]
        in_shape = st.cost_shape(node.inputs[0])
        sp = _prod(in_shape[2:]) if in_shape else None
        coef = (sp or 0) * int(np.prod(w.shape[2:])) * _per_sample(st, in_shape)
        has_b = input_or_none(node, 2) is not None
        if g == 1:
            if xi is not None:
                st.member(node, 1, 0, xi.ids, "in", xi.vals)
            out = st.source(node, y, 1, mg, _bias_vals(st, node, 2, zero_rows(w, 1)))
            st.member(node, 1, 1, out.ids, "out")
            if has_b:
                st.member(node, 2, 0, out.ids, "bias")
            st.layer(node, coef, out.ids, mg, None if xi is None else xi.ids, c)
        elif mg == 1 and xi is not None and len(xi) == g == c:
            st.set(y, xi.with_vals(np.where((xi.vals == 0) | zero_rows(w, 0),
                                            _bias_vals(st, node, 2, np.ones(c, bool)), np.nan)))
            st.member(node, 1, 0, xi.ids, "param")
            if has_b:
                st.member(node, 2, 0, xi.ids, "param")
            st.layer(node, coef, xi.ids, c, None, 1)
            st.needs_rewrite(node, self)
        else:
            self.unknown(node, st, "grouped ConvTranspose (not depthwise)")

    def rewrite(self, node, ctx, data) -> None:
        node.attrs["group"] = ctx.kept_count(ctx.info(node.inputs[0]).ids)


def contraction_macs(st: TraceState, node) -> int:
    """MACs of a MatMul between two activations (or with a batched weight) or of an Einsum, from the
    shapes at the model's input size: every output element costs one MAC per contracted index. The
    model's batch counts as 1 (heads folded into the batch axis, nn.MultiheadAttention's
    (B*H, T, D), still count). 0 when a shape is unknown."""
    if node.op == "MatMul":
        a, out = st.cost_shape(node.inputs[0]), st.cost_shape(node.outputs[0])
        if not a or out is None or None in a or None in out:
            return 0
        total = int(np.prod(out, dtype=np.float64)) * int(a[-1])
    elif node.op == "Einsum":
        eq = attr(node, "equation", b"")
        eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
        if "->" not in eq or "." in eq:
            return 0
        sizes: dict[str, int] = {}
        for term, t in zip(eq.split("->")[0].split(","), node.inputs):
            shp = st.cost_shape(t)
            if shp is None or len(shp) != len(term) or None in shp:
                return 0
            for letter, d in zip(term, shp):
                sizes[letter] = max(sizes.get(letter, 1), int(d))
        total = int(np.prod(list(sizes.values()), dtype=np.float64))
    else:
        return 0
    return int(total // max(st.batch, 1))


class GemmRule(Rule):
    ops = ("Gemm",)

    def trace(self, node, st: TraceState) -> None:
        b = st.const(node.inputs[1])
        c_in = input_or_none(node, 2)
        c = st.const(c_in) if c_in is not None else None
        if b is None or int(attr(node, "transA", 0)) or (c_in is not None and c is None):
            return self.unknown(node, st, "Gemm with a non-constant or transposed operand")
        trans_b = int(attr(node, "transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        n = b.shape[n_axis]
        ai = _input_info(st, node, 1, "Gemm reads channels on the row axis")
        if ai is not None:
            st.member(node, 1, k_axis, ai.ids, "in", ai.vals)
        zero = zero_rows(b, n_axis)
        bias_per_channel = c is not None and c.ndim >= 1 and c.shape[-1] == n and n > 1
        if c is None:
            col = np.zeros(n)
        else:  # C broadcasts to (M, N): per output column, beta * C if equal on every row, else NaN
            c2 = c.reshape((1,) * (2 - c.ndim) + c.shape)
            col = float(attr(node, "beta", 1.0)) * uniform_along(np.broadcast_to(c2, (c2.shape[0], n)), 1)
        vals = np.where(zero, col, np.nan)
        out = st.source(node, node.outputs[0], 1, n, vals)
        st.member(node, 1, n_axis, out.ids, "out")
        if bias_per_channel:
            st.member(node, 2, c.ndim - 1, out.ids, "bias")
        a_shape = st.cost_shape(node.inputs[0])  # (rows, in): rows are batch x tokens when tokens are flattened
        rows = int(a_shape[0]) if a_shape and len(a_shape) == 2 and isinstance(a_shape[0], int) else 1
        rows = max(1, rows // max(st.batch, 1))
        st.layer(node, rows, out.ids, n, None if ai is None else ai.ids, b.shape[k_axis])


class MatMulRule(Rule):
    ops = ("MatMul",)

    def trace(self, node, st: TraceState) -> None:
        b = st.const(node.inputs[1])
        a_shape = st.shape(node.inputs[0])
        cost_shape = st.cost_shape(node.inputs[0]) or a_shape
        if b is None and self._heads(node, st):
            return
        if b is None or b.ndim != 2 or a_shape is None or len(a_shape) < 2:
            fixed = contraction_macs(st, node)  # QK^T, attention x V, batched weights: counted, kept whole
            if fixed:
                st.layer(node, fixed, None, 1, None, 1)
            return self.unknown(node, st, "MatMul without a constant 2-D weight")
        r = len(a_shape)
        ai = _input_info(st, node, r - 1, "MatMul reads channels on a non-contracted axis")
        if ai is not None:
            st.member(node, 1, 0, ai.ids, "in", ai.vals)
        rows = [d or 1 for d in cost_shape[:-1]] + [1]  # every leading axis is rows (T-first layouts too)
        rows[0] = max(1, rows[0] // max(st.batch, 1))  # per sample
        out = st.source(node, node.outputs[0], r - 1, b.shape[1], np.where(zero_rows(b, 1), 0.0, np.nan))
        st.member(node, 1, 1, out.ids, "out")
        st.layer(node, int(np.prod(rows)), out.ids, b.shape[1], None if ai is None else ai.ids, b.shape[0])


    @staticmethod
    def _heads(node, st: TraceState) -> bool:
        """MatMul of two activations whose channels sit on a batch axis (attention heads: QK^T and
        attention x V on (B, H, T, D)): the same head of both operands is coupled, the output keeps
        the head axis, and the cost scales with the kept heads. False if it is not that case."""
        ins = node.inputs[:2]
        ranks = [st.rank(t) for t in ins]
        ro = st.rank(node.outputs[0])
        if None in ranks or ro is None or min(ranks) < 3:
            return False
        infos = [st.info(t) for t in ins]
        axes = {i.axis + ro - r for i, r in zip(infos, ranks) if i is not None}
        if len(axes) != 1:
            return False
        ax = axes.pop()
        if ax >= ro - 2:  # channels on a row or contracted axis: a real contraction over them
            return False
        n = max(len(i) for i in infos if i is not None)
        first = next(i for i in infos if i is not None)
        for t, i, r in zip(ins, infos, ranks):
            if i is None:
                shp = st.shape(t)
                if shp is None or ax - (ro - r) < 0 or shp[ax - (ro - r)] != 1:
                    return False  # an operand with that axis but without traced heads
            elif len(i) != n:
                return False
        for i in infos:
            if i is not None and i is not first:
                st.union(first.ids, i.ids)
        st.set(node.outputs[0], ChannelInfo(ax, first.ids, np.full(n, np.nan)))
        total = contraction_macs(st, node)
        if total:
            st.layer(node, max(1, total // n), first.ids, n, None, 1)
        return True


RULES = [ConvRule(), ConvTransposeRule(), GemmRule(), MatMulRule()]
