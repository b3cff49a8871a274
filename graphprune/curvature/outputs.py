"""What kind of likelihood each graph output is (METHODS §9): the label-free loss follows from it.

* a Softmax / LogSoftmax feeding the output directly or through shape-only ops (Identity, Transpose,
  Reshape, Flatten, Squeeze, Unsqueeze, Dropout, Cast): a categorical over the class axes, one per
  position (sequence steps, CTC frames, pixels); before opset 13 Softmax normalises everything
  from ``axis`` on (the input is flattened to 2-D there), so the class axes are ``axis..rank-1``;
* a Sigmoid the same way: a Bernoulli per score;
* otherwise, checked numerically on the first calibration samples: values in [0, 1] summing to one
  along an axis (probabilities) or log-sum-exp zero along it (log-probabilities): a categorical there;
* otherwise: the logits of a classifier (N x C, output 0 only) or a real value (Gaussian).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: ops that only move or relabel elements (the class axes map through them)
SHAPE_ONLY = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout", "Cast")
#: producers whose output cannot be a probability table (no numeric check after them)
_AFFINE = ("Gemm", "MatMul", "Conv", "ConvTranspose", "Add", "Sub", "BatchNormalization", "Einsum",
           "LayerNormalization", "Relu", "Tanh", "Gelu")


@dataclass(frozen=True)
class OutputKind:
    """How one output enters the loss.

    kind: "categorical" | "bernoulli" | "logits" (a classifier's unnormalised scores) | "real";
    axes: the class axes of a categorical (output coordinates, batch axis 0 excluded);
    source: what the output holds: "probs", "log-probs" or "logits";
    how: "graph" (found a Softmax/LogSoftmax/Sigmoid node), "numeric" (checked on data) or "shape".
    """
    kind: str
    axes: tuple[int, ...] = ()
    source: str = "logits"
    how: str = "shape"


def _producers(graph):
    return {t.name: n for n in graph.nodes for t in n.outputs if t.name}


def _static(state, tensor):
    shp = state.cost_shape(tensor) if state is not None else None
    if shp is None:
        shp = getattr(tensor, "shape", None)
    if shp is None or any(not isinstance(d, (int, np.integer)) or d is None or d < 0 for d in shp):
        return None
    return [int(d) for d in shp]


def _map_reshape(axes: tuple[int, ...], src: list[int], dst: list[int]) -> tuple[int, ...] | None:
    """Class axes through a reshape: the class block must stay one contiguous block of the same size
    with the same number of elements before it (size-1 dims next to it go to the positions)."""
    a0, a1 = min(axes), max(axes) + 1
    if list(axes) != list(range(a0, a1)):
        return None
    before, inside = math.prod(src[:a0]), math.prod(src[a0:a1])
    starts = [i for i in range(1, len(dst)) if math.prod(dst[:i]) == before]
    if not starts:
        return None
    start = starts[-1]
    for end in range(start + 1, len(dst) + 1):
        if math.prod(dst[start:end]) == inside:
            return tuple(range(start, end))
    return None


def _walk_back(graph, tensor, producers):
    """(the normalising node or None, the shape-only nodes between it and the output, in graph order)."""
    chain = []
    node = producers.get(tensor.name)
    while node is not None and node.op in SHAPE_ONLY:
        if node.op == "Cast" and str(node.attrs.get("to", 1)) not in ("1", "10", "11", "16"):
            return None, []  # cast to an integer type: not a distribution any more
        chain.append(node)
        node = producers.get(node.inputs[0].name)
    return node, chain[::-1]


def detect(graph, state, tensor, opset: int) -> OutputKind | None:
    """From the graph alone: the kind of ``tensor`` (a graph output), or None when the graph does not say."""
    producers = _producers(graph)
    node, chain = _walk_back(graph, tensor, producers)
    if node is None:
        return None
    if node.op == "Log" and producers.get(node.inputs[0].name) is not None:
        inner, inner_chain = _walk_back(graph, node.inputs[0], producers)
        if inner is not None and inner.op == "Softmax" and not inner_chain:
            node, source = inner, "log-probs"  # Log(Softmax(x)): log-probabilities
        else:
            return None
    elif node.op in ("Softmax", "LogSoftmax"):
        source = "probs" if node.op == "Softmax" else "log-probs"
    elif node.op == "Sigmoid":
        return OutputKind("bernoulli", (), "probs", "graph")
    else:
        return None
    x = node.outputs[0]
    shp = _static(state, x)
    rank = len(shp) if shp is not None else (len(x.shape) if getattr(x, "shape", None) is not None else None)
    if rank is None:
        return None
    if opset >= 13:
        a = int(node.attrs.get("axis", -1))
        a = a + rank if a < 0 else a
        axes = (a,)
    else:  # opset < 13: "flatten from axis"
        a = int(node.attrs.get("axis", 1))
        a = a + rank if a < 0 else a
        axes = tuple(range(a, rank))
    if 0 in axes:
        return None  # normalised over the batch axis: not a per-sample distribution
    for op in chain:
        src, dst = _static(state, op.inputs[0]), _static(state, op.outputs[0])
        if op.op == "Transpose":
            perm = op.attrs.get("perm")
            if perm is None:
                perm = list(range(rank))[::-1]
            axes = tuple(sorted(j for j, p in enumerate(perm) if p in axes))
        elif op.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            if src is None or dst is None:
                return None
            axes = _map_reshape(axes, src, dst)
            if axes is None:
                return None
            rank = len(dst)
        if not axes or 0 in axes:
            return None
    return OutputKind("categorical", axes, source, "graph")


def may_be_normalised(graph, tensor) -> bool:
    """False when the last real producer of ``tensor`` is affine-like (no numeric check needed)."""
    node, _ = _walk_back(graph, tensor, _producers(graph))
    return node is not None and node.op not in _AFFINE


def numeric(out: np.ndarray, atol: float = 1e-3) -> OutputKind | None:
    """Rows summing to one (probabilities) or log-sum-exp zero (log-probabilities) along an axis of a
    computed output (N, ...); the last such axis wins; then blocks of trailing axes (opset < 13)."""
    x = np.asarray(out, dtype=np.float64)
    if x.ndim < 2 or not np.all(np.isfinite(x)):
        return None
    rank = x.ndim
    candidates = [(a,) for a in range(rank - 1, 0, -1)] + [tuple(range(a, rank)) for a in range(1, rank - 1)]
    for axes in candidates:
        if math.prod(x.shape[a] for a in axes) < 2:
            continue
        if x.min() >= -1e-6 and x.max() <= 1 + 1e-6 and np.all(np.abs(x.sum(axis=axes) - 1) < atol):
            return OutputKind("categorical", axes, "probs", "numeric")
        if x.max() <= 1e-6:
            m = x.max(axis=axes, keepdims=True)
            lse = np.log(np.exp(x - m).sum(axis=axes)) + np.squeeze(m, axis=axes)
            if np.all(np.abs(lse) < atol):
                return OutputKind("categorical", axes, "log-probs", "numeric")
    return None
