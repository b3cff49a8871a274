"""Per-channel ops: unary activations, broadcasting arithmetic, normalisations."""
from __future__ import annotations

import math

import numpy as np

from .base import ChannelInfo, Rule, TraceState, across_channels, attr, input_or_none, norm_axis, uniform_along
from .structural import constant_channels
from .heads import uniform_operand

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _clip01(v):
    return np.clip(v, 0.0, 1.0)


# value maps used to prove channels constant (for --lossless); NaN propagates "unknown"
_UNARY = {
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Cast": lambda v, n: v,
    "Relu": lambda v, n: np.maximum(v, 0.0),
    "Sigmoid": lambda v, n: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda v, n: np.tanh(v),
    "HardSigmoid": lambda v, n: _clip01(attr(n, "alpha", 0.2) * v + attr(n, "beta", 0.5)),
    "HardSwish": lambda v, n: v * _clip01(v / 6.0 + 0.5),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, attr(n, "alpha", 0.01) * v),
    "Elu": lambda v, n: np.where(v > 0, v, attr(n, "alpha", 1.0) * (np.exp(v) - 1.0)),
    "Celu": lambda v, n: np.maximum(v, 0) + np.minimum(0, attr(n, "alpha", 1.0) * (np.exp(v / attr(n, "alpha", 1.0)) - 1)),
    "Selu": lambda v, n: attr(n, "gamma", 1.0507) * np.where(v > 0, v, attr(n, "alpha", 1.67326) * (np.exp(v) - 1.0)),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Softsign": lambda v, n: v / (1.0 + np.abs(v)),
    "Mish": lambda v, n: v * np.tanh(np.log1p(np.exp(v))),
    "Gelu": lambda v, n: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
    "Erf": lambda v, n: _erf(v),
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "Exp": lambda v, n: np.exp(v),
    "Sqrt": lambda v, n: np.sqrt(v),
    "Reciprocal": lambda v, n: 1.0 / v,
    "Floor": lambda v, n: np.floor(v),
    "Ceil": lambda v, n: np.ceil(v),
    "Round": lambda v, n: np.round(v),
    "Sign": lambda v, n: np.sign(v),
    "ThresholdedRelu": lambda v, n: np.where(np.isnan(v), np.nan, np.where(v > attr(n, "alpha", 1.0), v, 0.0)),
}


def _finite_or_nan(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.where(np.isfinite(v), v, np.nan)


class UnaryRule(Rule):
    ops = tuple(_UNARY)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        with np.errstate(all="ignore"):
            vals = _finite_or_nan(_UNARY[node.op](xi.vals, node))
        for i, out in enumerate(node.outputs):
            st.set(out, xi.with_vals(vals) if i == 0 else xi)  # Dropout's mask: same layout


class ClipRule(Rule):
    ops = ("Clip",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        lo, hi = attr(node, "min", -np.inf), attr(node, "max", np.inf)
        for i, name in ((1, "lo"), (2, "hi")):
            t = input_or_none(node, i)
            if t is None:
                continue
            c = st.const(t)
            if c is None or c.size != 1:
                return self.unknown(node, st, "Clip with non-constant bounds")
            lo, hi = (float(c), hi) if name == "lo" else (lo, float(c))
        st.set(node.outputs[0], xi.with_vals(np.clip(xi.vals, lo, hi)))


def _broadcast_vals(st: TraceState, t, axis_in_t: int) -> np.ndarray | float:
    """Value of a non-channel operand broadcast along the channel axis (scalar or NaN)."""
    c = st.const(t)
    if c is None or c.size == 0:
        return np.nan
    flat = c.reshape(-1).astype(np.float64)
    return float(flat[0]) if np.all(flat == flat[0]) else np.nan


def _mul(*vs):
    out = vs[0]
    for v in vs[1:]:
        out = out * v
    anyzero = np.zeros(np.shape(out), bool)
    finite = np.ones(np.shape(out), bool)
    for v in vs:
        anyzero |= np.asarray(v) == 0
        finite &= ~np.isinf(np.asarray(v))  # 0 * inf is NaN at run time, never 0
    return np.where(anyzero & finite, 0.0, out)


_NARY = {
    "Add": lambda a, b: a + b,
    "Sum": lambda *v: sum(v),
    "Sub": lambda a, b: a - b,
    "Mul": _mul,
    "Div": lambda a, b: np.where(np.asarray(a) == 0, np.where(np.asarray(b) != 0, 0.0, np.nan), a / b),
    "Max": lambda *v: np.maximum.reduce(np.broadcast_arrays(*v)),
    "Min": lambda *v: np.minimum.reduce(np.broadcast_arrays(*v)),
    "Mean": lambda *v: sum(v) / len(v),
    "Pow": lambda a, b: np.power(a, b),
    "PRelu": lambda x, s: np.where(x < 0, x * s, x),
}


class BroadcastRule(Rule):
    """Elementwise ops with numpy broadcasting. Operands carrying channels on the same output
    axis are coupled (residual sums, SE gates); constants of size C along that axis are members
    (per-channel bias/scale/slope); size-1 operands broadcast; anything else freezes."""

    ops = tuple(_NARY)
    data_input_only = False

    def trace(self, node, st: TraceState) -> None:
        ins = [t for t in node.inputs if t is not None and t.name]
        ranks = [st.rank(t) for t in ins]
        out_rank = st.rank(node.outputs[0])
        if out_rank is None and None not in ranks:
            out_rank = max(ranks)
        if out_rank is None or None in ranks:
            return self.unknown(node, st, f"{node.op} operand of unknown rank")
        infos = [st.info(t) for t in ins]
        axes = {info.axis + out_rank - r for info, r in zip(infos, ranks) if info is not None}
        if node.op == "PRelu" and infos[0] is None:
            return self.unknown(node, st, "PRelu slope carries channels")
        if len(axes) != 1:
            return self.unknown(node, st, f"{node.op} mixes channels of different axes")
        ax = axes.pop()
        n = max(len(i) for i in infos if i is not None)
        first = next(i for i in infos if i is not None and len(i) == n)
        operand_vals = []
        for i, (t, info, r) in enumerate(zip(ins, infos, ranks)):
            a_i = ax - (out_rank - r)
            if info is not None and len(info) == 1 < n:
                # one channel broadcast over all of them (spatial attention): nothing to couple; the
                # planner keeps at least one channel of every traced tensor, so it stays width 1
                operand_vals.append(float(info.vals[0]))
                continue
            if info is not None:
                if len(info) != n:
                    return self.unknown(node, st, f"{node.op} operands of different widths")
                st.union(first.ids, info.ids)
                operand_vals.append(info.vals)
                continue
            shp = st.shape(t)
            d = shp[a_i] if a_i >= 0 else 1
            c = st.const(t)
            if d == 1:
                operand_vals.append(_broadcast_vals(st, t, a_i))
            elif d == n and c is not None:
                st.member(node, node.inputs.index(t), a_i, first.ids, "param")
                operand_vals.append(uniform_along(c, a_i))
            elif d in (n, None) and constant_channels(st, node, node.inputs.index(t), a_i, first.ids):
                operand_vals.append(np.nan)  # a positional embedding sliced to the length or gathered
            elif d in (n, None) and uniform_operand(st, node, t, a_i, first.ids):
                operand_vals.append(np.nan)  # the same for every channel (a mask expanded over the heads)
            else:
                return self.unknown(node, st, f"{node.op} operand of unknown channel layout (computed at run "
                                              "time: a graph input, a sinusoidal positional embedding, ...)")
        with np.errstate(all="ignore"):
            vals = _finite_or_nan(np.broadcast_to(_NARY[node.op](*operand_vals), (n,)))
        st.set(node.outputs[0], ChannelInfo(ax, first.ids, vals))


class BatchNormRule(Rule):
    ops = ("BatchNormalization",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        params = [st.const(t) for t in node.inputs[1:5]]
        used_extra = any(o.outputs for o in node.outputs[1:])
        if xi.axis != 1 or any(p is None for p in params) or used_extra:
            return self.unknown(node, st, "BatchNormalization in training mode or with non-constant stats")
        for i in range(1, 5):
            st.member(node, i, 0, xi.ids, "param")
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = attr(node, "epsilon", 1e-5)
        vals = scale * (xi.vals - mean) / np.sqrt(var + eps) + bias
        st.set(node.outputs[0], xi.with_vals(_finite_or_nan(vals)))


class InstanceNormRule(Rule):
    ops = ("InstanceNormalization",)

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        scale, bias = st.const(node.inputs[1]), st.const(node.inputs[2])
        if xi.axis != 1 or scale is None or bias is None:
            return self.unknown(node, st, "InstanceNormalization with non-constant parameters")
        st.member(node, 1, 0, xi.ids, "param")
        st.member(node, 2, 0, xi.ids, "param")
        # a channel constant over space normalises to 0, so the output is its bias
        vals = np.where(np.isfinite(xi.vals), bias.astype(np.float64), np.nan)
        st.set(node.outputs[0], xi.with_vals(vals))


class AxisNormRule(Rule):
    """Normalisations/softmax over some axes: identity unless they reach over the channel axis."""

    ops = ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization")

    def trace(self, node, st: TraceState) -> None:
        xi = st.info(node.inputs[0])
        r = st.rank(node.inputs[0])
        if r is None:
            return self.unknown(node, st, f"{node.op} on a tensor of unknown rank")
        if node.op == "LayerNormalization":
            start = norm_axis(attr(node, "axis", -1), r)
            over = range(start, r)
        elif node.op == "LpNormalization":
            over = [norm_axis(attr(node, "axis", -1), r)]
        elif st.opset < 13:  # softmax family coerces to 2-D from `axis` on
            over = range(norm_axis(attr(node, "axis", 1), r), r)
        else:
            over = [norm_axis(attr(node, "axis", -1), r)]
        if any(st.info(t) is not None for t in node.inputs[1:]):
            return self.unknown(node, st, f"{node.op} with channel-carrying scale or bias")
        if xi.axis in over and node.op != "LayerNormalization":
            return self.unknown(node, st, across_channels(node.op))
        if xi.axis in over:
            # not equivalent to masking: every output depends on all channels. The channels still
            # pass through (same positions), so the residual stream it normalises stays one group
            # and freezes for this reason rather than for a symptom further on
            st.freeze(xi.ids, across_channels(node.op))
        st.set(node.outputs[0], xi.with_vals(np.nan))


RULES = [UnaryRule(), ClipRule(), BroadcastRule(), BatchNormRule(), InstanceNormRule(), AxisNormRule()]
