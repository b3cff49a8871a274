"""The vocabulary of channel rules.

Every channel of every tensor's channel axis gets an integer id. Rules say how ids flow
through their op (identity, offsets, repeats, tiles) and union ids that must be removed
together; the connected components are the *units* a pruner removes. Rules also record
*members*: constant slices (initializer, axis, ids along that axis) that shrink with a unit.

Each id also carries a per-channel constant value (NaN = unknown). Rules that can, compute
it, so ``--lossless`` can prove a channel is identically zero for every input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

#: the ONNX default domain as onnx-graphsurgeon (None, "") and the spec ("ai.onnx") spell it
DEFAULT_DOMAINS = (None, "", "ai.onnx")

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs


class UnionFind:
    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        """Root of every id (vectorised path halving until fixed point)."""
        p = self.parent.copy()
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


@dataclass
class ChannelInfo:
    """Which ids live along which axis of one tensor, with their known constant values."""

    axis: int
    ids: np.ndarray
    vals: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.vals is None:
            self.vals = np.full(len(self.ids), np.nan)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index, axis: int | None = None) -> "ChannelInfo":
        return ChannelInfo(self.axis if axis is None else axis, self.ids[index], self.vals[index])

    def with_axis(self, axis: int) -> "ChannelInfo":
        return ChannelInfo(axis, self.ids, self.vals)

    def with_vals(self, vals) -> "ChannelInfo":
        return ChannelInfo(self.axis, self.ids, np.broadcast_to(np.asarray(vals, dtype=np.float64), self.ids.shape).copy())


@dataclass
class Member:
    """A constant slice that belongs to channels: ``tensor[..., i, ...]`` along ``axis`` goes with ``ids[i]``.

    role: "out" (rows of a layer producing the channels), "in" (columns of a layer
    contracting over the channels: where removed channels are masked for verification),
    "param" (per-channel parameters of elementwise/normalisation/depthwise ops), "bias".
    vals: for "in" members, the known constant value of each consumed channel.
    """

    node: str
    input_index: int
    tensor: str
    axis: int
    ids: np.ndarray
    role: str
    vals: np.ndarray | None = None


@dataclass
class Source:
    node: str
    tensor: str
    ids: np.ndarray


@dataclass
class Layer:
    """A contraction (Conv/Gemm/MatMul): MACs = coef × kept(out_ids) × kept(in_ids) at batch 1."""

    node: str
    op: str
    coef: int
    out_ids: np.ndarray | None
    out_size: int
    in_ids: np.ndarray | None
    in_size: int


class TraceState:
    """What rules read and write while the tracer walks the graph in topological order."""

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.infos: dict[str, ChannelInfo] = {}
        self.members: list[Member] = []
        self.sources: list[Source] = []
        self.layers: list[Layer] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.rewrites: list[tuple["gs.Node", "Rule", object]] = []
        self.opset = 17
        self.static_shapes: dict[str, list] = {}  # shapes inferred at batch 1 (for cost only)
        #: tensors whose channel axis is folded into the batch axis (attention heads as (B*H, T, D):
        #: the axis holds batch x heads, the ids vary along the inner factor); only the ops in
        #: tracer._FOLD_SAFE may see them
        self.folded: set[str] = set()
        #: the batch the static shapes were measured at (1 unless the model fixes it): costs are per sample
        self.batch = 1
        #: names of the graph's outputs (an op whose extra outputs are read must know)
        self.graph_outputs: set[str] = set()
        #: (ids, n): the group holding these ids keeps at least n units (a pruned structure must stay
        #: the same kind of structure, e.g. a conv pruned by whole groups keeps 3 of them)
        self.min_units: list[tuple[np.ndarray, int]] = []

    # ---- tensors -------------------------------------------------------------------
    def info(self, tensor) -> ChannelInfo | None:
        return self.infos.get(tensor.name) if tensor is not None and tensor.name else None

    def set(self, tensor, info: ChannelInfo | None) -> None:
        if info is not None and tensor is not None and tensor.name:
            self.infos[tensor.name] = info

    @staticmethod
    def const(tensor) -> np.ndarray | None:
        import onnx_graphsurgeon as gs

        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def shape(self, tensor) -> list | None:
        """Static shape with ints for known dims and None for symbolic ones; None if the rank is unknown."""
        shp = self.sym_shape(tensor)
        return None if shp is None else [d if isinstance(d, int) else None for d in shp]

    def cost_shape(self, tensor) -> list | None:
        """Shape at batch 1 for cost counting: inferred with every dynamic input dim set to 1."""
        shp = self.static_shapes.get(tensor.name) if tensor is not None else None
        return shp if shp is not None else self.shape(tensor)

    def sym_shape(self, tensor) -> list | None:
        """Shape with ints for static dims and the symbol (str) or None for dynamic ones."""
        c = self.const(tensor)
        if c is not None:
            return list(c.shape)
        shp = getattr(tensor, "shape", None)
        if shp is None:  # shape inference gave up (a computed Reshape target): the rank measured at the
            # model's input size is still the rank at every size; the dims stay unknown
            static = self.static_shapes.get(getattr(tensor, "name", None) or "")
            return None if static is None else [None] * len(static)
        return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d if isinstance(d, str) and d else None)
                for d in shp]

    def rank(self, tensor) -> int | None:
        shp = self.shape(tensor)
        return None if shp is None else len(shp)

    # ---- channels ------------------------------------------------------------------
    def new_ids(self, n: int) -> np.ndarray:
        return self.uf.add(n)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.frozen.append((np.asarray(ids, dtype=np.int64), reason))

    def freeze_inputs(self, node, reason: str) -> None:
        for t in node.inputs:
            info = self.info(t)
            if info is not None:
                self.freeze(info.ids, reason)

    def keep_at_least(self, ids, n: int) -> None:
        self.min_units.append((np.asarray(ids, dtype=np.int64), int(n)))

    def source(self, node, tensor, axis: int, n: int, vals=None, tile: int = 1) -> ChannelInfo:
        """New channels created by a layer; ``tile`` > 1 repeats n ids g times (grouped conv outputs)."""
        ids = np.tile(self.new_ids(n), tile)
        self.sources.append(Source(node.name, tensor.name, ids))
        info = ChannelInfo(axis, ids, vals)
        self.set(tensor, info)
        return info

    def member(self, node, index: int, axis: int, ids, role: str, vals=None) -> None:
        t = node.inputs[index]
        self.members.append(Member(node.name, index, t.name, axis, np.asarray(ids, dtype=np.int64), role,
                                   None if vals is None else np.asarray(vals, dtype=np.float64)))

    def layer(self, node, coef: int, out_ids, out_size: int, in_ids, in_size: int) -> None:
        self.layers.append(Layer(node.name, node.op, int(coef), out_ids, int(out_size), in_ids, int(in_size)))

    def needs_rewrite(self, node, rule: "Rule", data=None) -> None:
        """Ask for ``rule.rewrite(node, ctx, data)`` after pruning (attributes, shape constants)."""
        self.rewrites.append((node, rule, data))


class RewriteContext:
    """What rules read while the rewriter adjusts attributes and shape constants."""

    def __init__(self, infos: dict[str, ChannelInfo], kept_fn: Callable[[np.ndarray], np.ndarray],
                 set_input: Callable) -> None:
        self.infos = infos
        self.kept = kept_fn  # ids -> bool mask
        self.set_input = set_input  # (node, index, np.ndarray) -> None, per-node copy of a constant

    def info(self, tensor) -> ChannelInfo | None:
        return self.infos.get(tensor.name) if tensor is not None and tensor.name else None

    def kept_count(self, ids) -> int:
        return int(self.kept(np.asarray(ids)).sum())


class Rule:
    """How channels flow through one or more op types. Subclasses override ``trace``."""

    ops: tuple[str, ...] = ()
    #: channels may only arrive through input 0 (the data input); if another input carries
    #: channels (say a channel tensor used as a shape), the tracer freezes them instead
    data_input_only: bool = True

    def trace(self, node, st: TraceState) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, node, ctx: RewriteContext, data) -> None:
        """Fix attributes/shape constants after pruning (only called if trace asked for it)."""

    @staticmethod
    def unknown(node, st: TraceState, reason: str) -> None:
        st.freeze_inputs(node, reason)


_NORM_REASON = "(removing one changes the statistics of the others: not the same as masking it)"
_ACROSS = {"LayerNormalization": f"LayerNormalization over the channels {_NORM_REASON}",
           "ReduceMean": "ReduceMean over the channels (RMSNorm or a written-out LayerNorm; attention weights "
                         "averaged over the heads): removing one changes the mean, not the same as masking it",
           "LpNormalization": f"LpNormalization over the channels {_NORM_REASON}"}


def across_channels(op: str) -> str:
    """Why an op that reduces or normalises over the channel axis freezes those channels."""
    return _ACROSS.get(op, f"{op} across the channel axis")


def attr(node, name: str, default=None):
    return node.attrs.get(name, default)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def input_or_none(node, i: int):
    if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name:
        return node.inputs[i]
    return None


def zero_rows(w: np.ndarray, axis: int) -> np.ndarray:
    """Per-index along ``axis``: is every weight in that slice zero?"""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return ~np.any(moved != 0, axis=1)


def uniform_along(c: np.ndarray, axis: int) -> np.ndarray:
    """Per-index value of a constant along ``axis`` if constant across the other axes, else NaN."""
    moved = np.moveaxis(c.astype(np.float64), axis, 0).reshape(c.shape[axis], -1)
    first = moved[:, :1]
    same = np.all(moved == first, axis=1)
    return np.where(same, first[:, 0], np.nan)

