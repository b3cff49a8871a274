"""Attention masks broadcast over the heads.

``nn.MultiheadAttention`` with a key padding mask (both PyTorch exporters) expands the mask
(B, 1, 1, T) over the heads before adding it to the scores (B, H, T, T)::

    Expand(mask, [1, H, 1, 1]) -> Reshape (B*H, 1, T) -> Reshape (B, H, -1, T) -> Add(scores, .)

with H written as constants (the Expand shape, ``Shape(x)[1] * H`` in the fold, H in the unfold).
Every head sees the same mask, so the operand is *uniform* along the heads: it equals the mask
with a head axis of size 1, broadcast. When heads are pruned the chain is rewritten to produce that
size-1 axis (each H constant becomes 1), which is exactly equivalent whatever heads are kept and
however many layers share the chain (the dynamo exporter computes the mask once for all layers).

:func:`uniform_operand` proves the uniformity by walking back from the operand through ops that
keep it (Expand of a size-1 axis, folding the heads into the batch axis as its inner factor and
unfolding them again, Cast/Identity/Transpose, elementwise ops whose inputs are all uniform or
size 1) and records the constants to rewrite. :func:`check_mask_chains` runs after tracing: every
tensor of a chain must be read only by the chain itself or by elementwise ops that accepted it
(anything else would see the head count change); otherwise the rewrites are dropped and the heads
of every op that accepted the chain freeze.
"""
from __future__ import annotations

import numpy as np

from .base import DEFAULT_DOMAINS as _DEFAULT_DOMAINS, ChannelInfo, Rule, TraceState, attr, input_or_none

#: elementwise ops through which uniformity along an axis survives (every input uniform or size 1)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Not", "And", "Or", "Xor", "Equal", "Less",
                          "LessOrEqual", "Greater", "GreaterOrEqual", "Neg", "Abs", "Max", "Min", "Sum"})
_PASS = frozenset({"Cast", "Identity"})
_MAX_DEPTH = 16

SHARED_REASON = ("an attention mask broadcast over the heads is also read elsewhere (another op or a graph "
                 "output) with its head count")


class MaskChain:
    """The ops that make one operand uniform along the heads, and who reads it."""

    def __init__(self, operand: str, axis: int) -> None:
        self.operand = operand
        self.axis = axis
        self.nodes: set[str] = set()  # producers of the chain's tensors
        self.edges: set[tuple[str, int]] = set()  # (node, input index) the walk went through
        #: tensor name -> (axis, folded?): the axis whose size becomes 1 (folded: the batch axis
        #: that holds batch x heads, whose size becomes the batch)
        self.tensors: dict[str, tuple[int, bool]] = {}
        self.consumers: dict[str, np.ndarray] = {}  # node name -> channel ids it broadcasts against


class MaskRewrite(Rule):
    """Writes 1 into one head-count constant of a mask chain and fixes the declared shapes below it."""

    ops = ()

    def rewrite(self, node, ctx, data) -> None:
        from .structural import _producer_named

        _, (host, index, flat), _ids, _rep, chain = data
        target = node if host == node.name else _producer_named(node, host)
        old = np.asarray(target.inputs[index].values)
        new = old.copy().reshape(-1)
        new[flat] = 1
        ctx.set_input(target, index, new.reshape(old.shape).astype(old.dtype))
        stack, seen = [node], set()
        while stack:  # the tensors below this constant: their head axis is 1 now (folded: unknown)
            n = stack.pop()
            for o in n.outputs:
                if o.name not in chain.tensors or id(o) in seen:
                    continue
                seen.add(id(o))
                axis, folded = chain.tensors[o.name]
                if o.shape is not None and axis < len(o.shape):
                    shape = list(o.shape)
                    shape[axis] = None if folded else 1
                    o.shape = shape
                stack.extend(c for c in o.outputs if c.name in chain.nodes)


MASK_REWRITE = MaskRewrite()


def is_mask_rewrite(entry) -> bool:
    return entry[1] is MASK_REWRITE


def uniform_operand(st: TraceState, node, t, axis: int, ids) -> bool:
    """Is input ``t`` of the elementwise ``node`` (no traced channels; ``axis`` in its own
    coordinates, where the other operands carry ``len(ids)`` channels) the same along that axis,
    with a size set by constants that can become 1? Then records the rewrites (the operand is
    rewritten to broadcast, equivalent for any kept channels) and returns True; else changes nothing."""
    if st.info(t) is not None or not t.name:
        return False
    shp = st.cost_shape(t)
    if shp is None or axis < 0 or axis >= len(shp) or shp[axis] != len(ids) or len(ids) < 2:
        return False
    for entry in st.rewrites:  # a chain proved for another reader (a mask shared by layers)
        if is_mask_rewrite(entry) and entry[2][4].operand == t.name:
            chain = entry[2][4]
            if chain.axis != axis:
                return False
            chain.consumers[node.name] = np.asarray(ids)
            return True
    chain = MaskChain(t.name, axis)
    sites: list = []
    if not _walk(st, t, axis, False, chain, sites, 0) or not sites:
        return False
    chain.consumers[node.name] = np.asarray(ids)
    for site_node, where in sites:
        st.needs_rewrite(site_node, MASK_REWRITE, ("entry", where, np.asarray(ids), 1, chain))
    return True


def _record(chain: MaskChain, t, axis: int, folded: bool) -> bool:
    known = chain.tensors.get(t.name)
    if known is not None:
        return known == (axis, folded)
    chain.tensors[t.name] = (axis, folded)
    return True


def _walk(st: TraceState, t, axis: int, folded: bool, chain: MaskChain, sites: list, depth: int) -> bool:
    """``t`` must be uniform along ``axis`` (folded: along the inner factor, the heads, of the batch
    axis ``axis`` = batch x heads). Appends (node, (host, input, flat index)) of every head count to
    rewrite to ``sites``."""
    if depth > _MAX_DEPTH or t is None or st.info(t) is not None:
        return False
    shp = st.cost_shape(t)
    if shp is None or axis >= len(shp) or shp[axis] is None:
        return False
    static = st.shape(t)
    if not folded and static is not None and static[axis] == 1:
        return True  # a size-1 axis broadcasts: nothing to rewrite above it
    if st.const(t) is not None or not t.inputs:
        return False  # a graph input or a constant with the heads: not rewritable here
    p = t.inputs[0]
    if p.domain not in _DEFAULT_DOMAINS or len(p.outputs) != 1 or not _record(chain, t, axis, folded):
        return False
    chain.nodes.add(p.name)
    if p.op in _PASS:
        return _walk_in(st, p, 0, axis, folded, chain, sites, depth)
    if p.op == "Transpose":
        perm = attr(p, "perm", None)
        if perm is None:
            perm = list(range(len(shp)))[::-1]
        return _walk_in(st, p, 0, int(perm[axis]), folded, chain, sites, depth)
    if p.op == "Reshape":
        return _through_reshape(st, p, shp, axis, folded, chain, sites, depth)
    if folded:
        return False
    if p.op == "Expand":
        return _through_expand(st, p, shp, axis, chain, sites, depth)
    if p.op in _ELEMENTWISE:
        for i, x in enumerate(p.inputs):
            if x is None or not x.name:
                continue
            xs = st.shape(x)
            if xs is None:
                return False
            ax = axis - (len(shp) - len(xs))
            if ax < 0 or xs[ax] == 1:  # broadcast (a static 1: a dynamic dim may be 1 only here)
                continue
            if not _walk_in(st, p, i, ax, False, chain, sites, depth):
                return False
        return True
    return False


def _walk_in(st, p, index: int, axis: int, folded: bool, chain: MaskChain, sites: list, depth: int) -> bool:
    """Walk on into input ``index`` of the chain node ``p``."""
    chain.edges.add((p.name, index))
    return _walk(st, p.inputs[index], axis, folded, chain, sites, depth + 1)


def _through_expand(st, p, shp, axis, chain, sites, depth) -> bool:
    x, s = p.inputs[0], st.const(p.inputs[1])
    xs = st.shape(x)
    if s is None or xs is None or s.ndim != 1 or len(shp) != max(len(s), len(xs)):
        return False
    k = axis - (len(shp) - len(s))
    ax = axis - (len(shp) - len(xs))
    x_dim = xs[ax] if ax >= 0 else 1
    if k >= 0 and int(s[k]) == shp[axis] and x_dim == 1:  # the shape names the head count: make it 1
        sites.append((p, (p.name, 1, k)))
        return True
    if (k < 0 or int(s[k]) == 1) and ax >= 0:  # broadcast elsewhere: the heads come from x
        return _walk_in(st, p, 0, ax, False, chain, sites, depth)
    return False


def _through_reshape(st, p, shp, axis, folded, chain, sites, depth) -> bool:
    """Unfold (B*H, ...) -> (B, H, ...) with H a constant or -1, or fold (B, H, ...) -> (B*H, ...)
    with B*H written as ``Shape(x)[k] * H`` or -1; the other entries must not change with pruning."""
    from .structural import _literal_zero, _runtime_size, _shape_elements

    x = p.inputs[0]
    xs = st.cost_shape(x)
    elements = _shape_elements(p.inputs[1], st, host=(p.name, 1))
    if xs is None or None in xs or None in shp or elements is None or len(elements) != len(shp):
        return False
    if _literal_zero(p, elements):
        return False

    def fixed(e) -> bool:  # a size pruning cannot change, or a constant
        return _runtime_size(st, e) or e is not None and e[0] == "const"

    def others_ok(skip: int, minus_one_left: bool) -> bool:
        for i, e in enumerate(elements):
            if i == skip:
                continue
            if not fixed(e) or e[0] == "const" and e[1] not in (shp[i], -1, 0):
                return False
            if e[0] == "const" and e[1] == 0 and not (i < len(xs) and xs[i] == shp[i]):
                return False
            if e[0] == "const" and e[1] == -1 and not minus_one_left:
                return False
        return True

    if not folded:  # unfold: x (..., B*H, rest) -> t (..., B, H, rest), heads at ``axis``
        a = axis
        if (a < 1 or len(xs) != len(shp) - 1 or xs[:a - 1] != shp[:a - 1] or xs[a - 1] != shp[a - 1] * shp[a]
                or xs[a:] != shp[a + 1:]):
            return False
        e = elements[a]
        if e is not None and e[0] == "const" and e[1] == -1:
            if not others_ok(a, False):
                return False
        elif e is not None and e[0] == "const" and e[1] == shp[a] and e[2] is not None:
            if not others_ok(a, True):
                return False
            sites.append((p, e[2]))
        else:
            return False
        return _walk_in(st, p, 0, a - 1, True, chain, sites, depth)
    # fold: x (..., B, H, rest) -> t (..., B*H, rest), heads at axis f + 1 of x
    f = axis
    if len(xs) != len(shp) + 1 or xs[:f] != shp[:f] or xs[f] * xs[f + 1] != shp[f] or xs[f + 2:] != shp[f + 1:]:
        return False
    e = elements[f]
    if e is not None and e[0] == "const" and e[1] == -1:
        if not others_ok(f, False):
            return False
    elif (e is not None and e[0] == "mul" and fixed(e) and e[2] == xs[f + 1] and e[3] is not None):
        if not others_ok(f, True):
            return False
        sites.append((p, e[3]))
    else:
        return False
    return _walk_in(st, p, 0, f + 1, False, chain, sites, depth)


def check_mask_chains(graph, st: TraceState) -> list:
    """After tracing: a chain whose tensors are read by anything but the chain itself and the ops
    that accepted it (or that is a graph output) keeps its head count: its rewrites are dropped and
    the channels of its readers freeze. Returns the chains that stay."""
    chains = {}
    for entry in st.rewrites:
        if is_mask_rewrite(entry):
            chains.setdefault(id(entry[2][4]), entry[2][4])
    if not chains:
        return []
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    bad = []
    for chain in chains.values():
        ok = True
        for name in chain.tensors:
            t = tensors.get(name)
            if t is None or name in outputs:
                ok = False
                break
            for c in t.outputs:
                if name == chain.operand:
                    ok = ok and c.name in chain.consumers
                else:  # only where the walk went (not, say, as a shape input)
                    ok = ok and all((c.name, i) in chain.edges for i, x in enumerate(c.inputs) if x is t)
            if not ok:
                break
        if not ok:
            bad.append(chain)
    drop_chains(st, bad, SHARED_REASON)
    return [c for c in chains.values() if all(c is not b for b in bad)]


def drop_chains(st: TraceState, chains, reason: str) -> None:
    """Give up on ``chains``: no rewrite, and the channels their readers broadcast against freeze."""
    if not chains:
        return
    ids = {id(c) for c in chains}
    st.rewrites[:] = [e for e in st.rewrites if not (is_mask_rewrite(e) and id(e[2][4]) in ids)]
    for chain in chains:
        for consumer_ids in chain.consumers.values():
            st.freeze(consumer_ids, reason)


class AttentionRule(Rule):
    """ONNX's own Attention op (opset 23+, what the dynamo exporter writes for
    scaled_dot_product_attention at opset 23). Heads are independent inside it: a unit is one k/v
    head with the q heads that read it (one q head without grouped-query attention; q head h reads
    kv head h // (Hq / Hkv) with it), and the output keeps the q heads:

    * 4-D q/k/v (B, H, S, D): the head axis 1 of q, k and v carries traced heads (head splits
      upstream, whose head counts their own rules rewrite); the output (B, Hq, Sq, Dv) keeps q's;
    * 3-D q/k/v (B, S, H*D) with ``q_num_heads``/``kv_num_heads``: each head's D channels join its
      unit, the output (B, Sq, Hq*Dv) carries them per q head, and both attributes are rewritten to
      the kept counts.

    The default scale 1/sqrt(D) does not depend on the head count. Frozen instead: q heads that are
    not a whole multiple of the k/v heads, q, k and v that do not all carry the heads, a mask with a
    head axis that is not the q heads, a KV cache (past inputs, present outputs) and the
    qk_matmul_output output (their head count would change)."""

    ops = ("Attention",)
    data_input_only = False

    def trace(self, node, st: TraceState) -> None:
        from .structural import _one_unit_per_head

        q, k, v = node.inputs[:3]
        infos = [st.info(t) for t in (q, k, v)]
        ranks = [st.rank(t) for t in (q, k, v)]
        shapes = [st.cost_shape(t) for t in (q, k, v)]
        if any(input_or_none(node, i) is not None for i in (4, 5)) or any(
                t is not None and t.name and (t.outputs or t.name in st.graph_outputs) for t in node.outputs[1:]):
            return self.unknown(node, st, "Attention with a KV cache or its qk_matmul_output read (their head "
                                          "count would change)")
        if None in infos or None in ranks or len(set(ranks)) != 1 or ranks[0] not in (3, 4) or None in shapes \
                or any(None in s for s in shapes):
            return self.unknown(node, st, "Attention whose q, k and v do not all carry traced heads")
        three_d = ranks[0] == 3
        if three_d:
            hq, hkv = int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0))
            if any(i.axis != 2 for i in infos):
                return self.unknown(node, st, "Attention with channels off the hidden axis")
        else:
            if any(i.axis != 1 for i in infos):
                return self.unknown(node, st, "Attention with heads off axis 1")
            hq, hkv = len(infos[0]), len(infos[1])
        if hq <= 0 or hkv <= 0 or hq % hkv or len(infos[2]) % hkv:
            return self.unknown(node, st, "Attention whose q heads are not whole groups of its k/v heads")
        g = hq // hkv
        if three_d:
            d, dv = len(infos[0]) // hq, len(infos[2]) // hkv
            if d * hq != len(infos[0]) or d * hkv != len(infos[1]) or dv * hkv != len(infos[2]):
                return self.unknown(node, st, "Attention whose widths are not whole heads")
            q_heads = _one_unit_per_head(st, infos[0], hq, d)
            k_heads, v_heads = _one_unit_per_head(st, infos[1], hkv, d), _one_unit_per_head(st, infos[2], hkv, dv)
        else:
            if len(infos[2]) != hkv:
                return self.unknown(node, st, "Attention whose k and v heads differ")
            q_heads, k_heads, v_heads = (i.ids for i in infos)
        st.union(k_heads, v_heads)
        st.union(np.repeat(k_heads, g), q_heads)  # q head h reads kv head h // g
        mask = input_or_none(node, 3)
        if mask is not None:
            m_shape, mi = st.cost_shape(mask), st.info(mask)
            if m_shape is None:
                return self.unknown(node, st, "Attention with a mask of unknown shape")
            ax = len(m_shape) - 3
            if ax >= 0 and m_shape[ax] != 1:
                if mi is None or mi.axis != ax or len(mi) != hq:
                    return self.unknown(node, st, "Attention with a per-head mask that is not those heads")
                st.union(q_heads, mi.ids)
            elif mi is not None:
                st.freeze(mi.ids, "Attention mask channels on a broadcast axis")
        if three_d:
            if g == 1:
                out = infos[2].ids  # output channel (h, e) is v's channel (h, e)
            else:  # q head h's Dv outputs: new ids in its unit
                out = st.new_ids(hq * dv).reshape(hq, dv)
                st.union(np.repeat(q_heads, dv), out.reshape(-1))
                out = out.reshape(-1)
            st.set(node.outputs[0], ChannelInfo(2, out, np.full(len(out), np.nan)))
            st.needs_rewrite(node, self, {"kv_heads": k_heads, "group": g})
        else:
            st.set(node.outputs[0], ChannelInfo(1, q_heads, np.full(hq, np.nan)))
        # per unit: g q heads, each Sq x Skv scores of D MACs and Sq x Dv outputs of Skv MACs
        (sq, dq), (skv, dvv) = self._sizes(shapes[0], hq if three_d else None), \
            self._sizes(shapes[2], hkv if three_d else None)
        st.layer(node, max(1, g * sq * skv * (dq + dvv)), k_heads, hkv, None, 1)

    @staticmethod
    def _sizes(shape, heads):
        """(sequence length, head width) of a 3-D (B, S, H*D) or 4-D (B, H, S, D) operand."""
        if heads is not None:
            return int(shape[1]), int(shape[2]) // heads
        return int(shape[2]), int(shape[3])

    def rewrite(self, node, ctx, data) -> None:
        kept = ctx.kept_count(data["kv_heads"])
        node.attrs["q_num_heads"] = kept * data["group"]
        node.attrs["kv_num_heads"] = kept


RULES = [AttentionRule()]
