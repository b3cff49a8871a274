"""EigenDamage (Wang et al. 2019, METHODS §5): prune in the Kronecker-factored eigenbasis.

Per layer (group-1 Conv, Gemm, MatMul), with K-FAC factors A (input channels; for convs the
"patch" variant averaging over the kh·kw taps) and S (outputs):
  A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ, W* = Q_Sᵀ W Q_A,  ΔL_ij = ½ Σ_taps W*²_ij Λ_S,i Λ_A,j
Eigen-rows/columns with the least ΔL per MAC saved are removed globally; a layer whose kept ranks
make the bottleneck  x → Q_A' (1×1) → core W*' (original kernel) → Q_S' (1×1) + bias  cheaper
than itself is rewritten as those three nodes. The input/output channels are unchanged, so no
channel group is involved and the rest of the graph is untouched.

``eigendamage-channel`` (a different method) projects the KFE importances back onto the original
output/input channels and is used as an ordinary channel criterion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from .criteria.base import ScoringContext
from .criteria.curvature import DTYPE, _LayerwiseCriterion, damped, unit_sums
from .errors import UserError


@dataclass
class KFE:
    node: str
    QS: np.ndarray  # (M, M)
    lamS: np.ndarray
    QA: np.ndarray  # (C, C)
    lamA: np.ndarray
    Wstar: np.ndarray  # (M, C, taps) rotated weight
    row_imp: np.ndarray  # (M,)
    col_imp: np.ndarray  # (C,)
    elem: np.ndarray  # (M, C) ΔL of every eigen-entry
    t_in: int  # input positions at batch 1
    t_out: int


def channel_factor(A: torch.Tensor, taps: int) -> torch.Tensor:
    """The patch variant: average the (C·taps)² input factor over taps → (C, C)."""
    c = A.shape[0] // taps
    return A.reshape(c, taps, c, taps).diagonal(dim1=1, dim2=3).mean(-1)


def decompose(ctx: ScoringContext, view, damping: float) -> KFE:
    st = ctx.stats.layers[view.node]
    A = damped(st.A.to(DTYPE) / max(st.a_count, 1), damping)[:-1, :-1]  # without the bias input
    S = damped(st.S.to(DTYPE) / max(st.n, 1), damping)
    Ac = channel_factor(A, view.taps)
    lamA, QA = torch.linalg.eigh(Ac)
    lamS, QS = torch.linalg.eigh(S)
    tensors = ctx.trace.graph.tensors()
    W = torch.as_tensor(view.canonical(np.asarray(tensors[view.weight].values)), dtype=DTYPE)
    W = W.reshape(view.out, -1, view.taps)
    Wstar = torch.einsum("mi,mct,cj->ijt", QS, W, QA)
    elem = 0.5 * Wstar.pow(2).sum(-1) * lamS[:, None] * lamA[None, :]
    node = ctx.trace.graph_node(view.node)
    shape_in = ctx.trace.state.cost_shape(node.inputs[0]) or []
    shape_out = ctx.trace.state.cost_shape(node.outputs[0]) or []

    def positions(shape):
        if view.op == "Conv":
            return int(np.prod([d or 1 for d in shape[2:]]))
        return int(np.prod([d or 1 for d in shape[1:-1]])) if len(shape) > 2 else 1

    return KFE(view.node, QS.numpy(), lamS.numpy(), QA.numpy(), lamA.numpy(), Wstar.numpy(),
               elem.sum(1).numpy(), elem.sum(0).numpy(), elem.numpy(), positions(shape_in), positions(shape_out))


def layer_macs(view, k: KFE, r: int, p: int) -> tuple[float, float]:
    """(original MACs, bottleneck MACs with r eigen-rows and p eigen-columns) at batch 1."""
    m, c = view.out, view.cols // view.taps
    orig = k.t_out * m * c * view.taps
    bneck = k.t_in * c * p + k.t_out * r * p * view.taps + k.t_out * m * r
    return float(orig), float(bneck)


def output_layers(ctx: ScoringContext) -> set[str]:
    """Layers whose output channels reach a graph output (classifier heads): their output space is
    the model's answer, so its rank is kept whole (the Fisher of a confident head is tiny, which
    would make cutting it look free)."""
    out = set()
    for g in ctx.trace.groups:
        if any(r.startswith("reaches graph output") for r in g.frozen):
            out.update(s.node for s in g.sources)
    return out


def plan_ranks(ctx: ScoringContext, kfes: dict[str, KFE], target_macs: float, fixed_macs: float):
    """Greedy global removal of eigen-rows/columns (least ΔL per MAC saved, re-evaluated lazily).
    Returns {node: (kept row indices, kept column indices)} for layers worth rewriting."""
    state = {}
    heads = output_layers(ctx)
    for name, k in kfes.items():
        view = ctx.views[name]
        state[name] = {"rows": list(np.argsort(k.row_imp)), "cols": list(np.argsort(k.col_imp)),
                       "r": view.out, "p": view.cols // view.taps}

    def cost(name, r, p):
        o, b = layer_macs(ctx.views[name], kfes[name], r, p)
        return min(o, b)

    def total():
        return fixed_macs + sum(cost(n, s["r"], s["p"]) for n, s in state.items())

    def candidates():
        for name, s in state.items():
            k, view = kfes[name], ctx.views[name]
            o, _ = layer_macs(view, k, s["r"], s["p"])
            if s["r"] > 1 and name not in heads:
                i = s["rows"][view.out - s["r"]]
                _, b0 = layer_macs(view, k, s["r"], s["p"])
                _, b1 = layer_macs(view, k, s["r"] - 1, s["p"])
                yield k.row_imp[i] / max(b0 - b1, 1e-9), name, "r"
            if s["p"] > 1:
                j = s["cols"][view.cols // view.taps - s["p"]]
                _, b0 = layer_macs(view, k, s["r"], s["p"])
                _, b1 = layer_macs(view, k, s["r"], s["p"] - 1)
                yield k.col_imp[j] / max(b0 - b1, 1e-9), name, "p"

    current = total()
    while current > target_macs:
        best = min(candidates(), default=None)
        if best is None:
            break
        _, name, which = best
        state[name][which] -= 1
        current = total()
    out = {}
    for name, s in state.items():
        view, k = ctx.views[name], kfes[name]
        o, b = layer_macs(view, k, s["r"], s["p"])
        if b < o:
            m, c = view.out, view.cols // view.taps
            out[name] = (np.sort(np.asarray(s["rows"][m - s["r"]:])), np.sort(np.asarray(s["cols"][c - s["p"]:])))
    return out, current


def rewrite(graph: gs.Graph, ctx: ScoringContext, kfes: dict[str, KFE], ranks: dict) -> list[dict]:
    """Replace each planned layer by Q_A' → core → Q_S' (+bias) in ``graph`` (in place)."""
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    info = []
    for name, (R, P) in ranks.items():
        view, k, node = ctx.views[name], kfes[name], nodes[name]
        qa = k.QA[:, P].astype(np.float32)  # (C, p)
        qs = k.QS[:, R].astype(np.float32)  # (M, r)
        core = k.Wstar[np.ix_(R, P)].astype(np.float32)  # (r, p, taps)
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if view.bias else None
        mid1 = gs.Variable(f"{name}__ed_in", dtype=y.dtype)
        mid2 = gs.Variable(f"{name}__ed_core", dtype=y.dtype)
        if view.op == "Conv":
            nd = len(view.conv["kernel"])
            one = (1,) * nd
            w1 = gs.Constant(f"{name}__ed_qa", qa.T.reshape(len(P), -1, *one).copy())
            w2 = gs.Constant(f"{name}__ed_core_w", core.reshape(len(R), len(P), *view.conv["kernel"]).copy())
            w3 = gs.Constant(f"{name}__ed_qs", qs.reshape(view.out, len(R), *one).copy())
            attrs = {k_: v for k_, v in node.attrs.items() if k_ != "group"}
            new = [gs.Node("Conv", f"{name}__ed1", {"kernel_shape": list(one)}, [x, w1], [mid1]),
                   gs.Node("Conv", f"{name}__ed2", attrs, [mid1, w2], [mid2]),
                   gs.Node("Conv", f"{name}__ed3", {"kernel_shape": list(one)}, [mid2, w3] + ([bias] if bias else []), [y])]
        else:
            w1 = gs.Constant(f"{name}__ed_qa", qa.copy())  # x (.., C) @ (C, p)
            w2 = gs.Constant(f"{name}__ed_core_w", core[:, :, 0].T.copy())  # (p, r)
            w3 = gs.Constant(f"{name}__ed_qs", qs.T.copy())  # (r, M)
            new = [gs.Node("MatMul", f"{name}__ed1", {}, [x, w1], [mid1]),
                   gs.Node("MatMul", f"{name}__ed2", {}, [mid1, w2], [mid2])]
            if bias is not None:
                mid3 = gs.Variable(f"{name}__ed_out", dtype=y.dtype)
                new += [gs.Node("MatMul", f"{name}__ed3", {}, [mid2, w3], [mid3]),
                        gs.Node("Add", f"{name}__ed4", {}, [mid3, bias], [y])]
            else:
                new.append(gs.Node("MatMul", f"{name}__ed3", {}, [mid2, w3], [y]))
        node.outputs.clear()
        graph.nodes.extend(new)
        o, b = layer_macs(view, k, len(R), len(P))
        info.append({"layer": name, "rows": view.out, "cols": view.cols // view.taps, "kept_rows": len(R),
                     "kept_cols": len(P), "macs_before": o, "macs_after": b,
                     "nodes": [n.name for n in new], "weights": [w1.name, w2.name, w3.name]})
    del tensors
    graph.cleanup().toposort()
    return info


def projected_weights(ctx: ScoringContext, kfes: dict[str, KFE], ranks: dict) -> dict[str, np.ndarray]:
    """The low-rank weight Q_S' W*' Q_A'ᵀ in each rewritten layer's original layout (the reference
    the rewritten model must equal)."""
    out = {}
    tensors = ctx.trace.graph.tensors()
    for name, (R, P) in ranks.items():
        view, k = ctx.views[name], kfes[name]
        W = np.einsum("mi,ijt,cj->mct", k.QS[:, R], k.Wstar[np.ix_(R, P)], k.QA[:, P])
        w_like = np.asarray(tensors[view.weight].values)
        out[view.weight] = view.split(W.reshape(view.out, -1), w_like, False)[0]
    return out


def weights_from_bottleneck(values: dict[str, np.ndarray], entry: dict, view) -> np.ndarray:
    """Rebuild the dense weight (original layout) from a rewritten layer's three weights."""
    qa, core, qs = (values[n] for n in entry["weights"])
    if view.op == "Conv":
        W = np.einsum("pc,rpt,mr->mct", qa.reshape(qa.shape[0], -1), core.reshape(core.shape[0], core.shape[1], -1),
                      qs.reshape(qs.shape[0], -1))
        return W.reshape(view.out, -1, *view.conv["kernel"])
    W = (qa @ core @ qs).T  # (M, C)
    return W if view.trans_b else W.T


def check_ranks(values: dict[str, np.ndarray], entry: dict, view) -> str | None:
    """None if the three weights have the shapes of the bottleneck the report records for this layer
    (kept_rows R, kept_cols P), else the reason: the structure, whatever the values."""
    qa, core, qs = (values[n] for n in entry["weights"])
    R, P, C, M = entry.get("kept_rows"), entry.get("kept_cols"), view.cols // view.taps, view.out
    if view.op == "Conv":
        ones = (1,) * len(view.conv["kernel"])
        ok = (qa.shape == (P, C, *ones) and core.shape == (R, P, *view.conv["kernel"])
              and qs.shape == (M, R, *ones))
    else:
        ok = qa.shape == (C, P) and core.shape == (P, R) and qs.shape == (R, M)
    return None if ok else f"{entry.get('layer')}: bottleneck weights do not have the reported ranks"


def check_bottleneck(values: dict[str, np.ndarray], entry: dict, view, w_orig: np.ndarray, tol: float = 1e-4):
    """None if the three weights are orthonormal rotations around the original weight's projection
    (core = Q_S'ᵀ W Q_A'), else the reason. This ties the rewritten layer to the ORIGINAL weights."""
    qa, core, qs = (values[n].astype(np.float64) for n in entry["weights"])
    if view.op == "Conv":
        QA, QS = qa.reshape(qa.shape[0], -1).T, qs.reshape(qs.shape[0], -1)
        core = core.reshape(core.shape[0], core.shape[1], -1)
    else:
        QA, QS, core = qa, qs.T, core.T[:, :, None]
    for name, Q in (("Q_A", QA), ("Q_S", QS)):
        if np.max(np.abs(Q.T @ Q - np.eye(Q.shape[1]))) > tol:
            return f"{entry['layer']}: {name} is not orthonormal"
    W = view.canonical(w_orig).reshape(view.out, -1, view.taps)
    expected = np.einsum("mr,mct,cp->rpt", QS, W, QA)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    if expected.shape != core.shape or np.max(np.abs(expected - core)) / scale > tol:
        return f"{entry['layer']}: core is not the original weight projected on the kept eigenvectors"
    return None


class EigenDamageChannel(_LayerwiseCriterion):
    """KFE importance projected onto original channels: out channel o gets Σ_i Q_S[o,i]² ΔL_row(i),
    input channel c gets Σ_j Q_A[c,j]² ΔL_col(j)."""

    name = "eigendamage-channel"
    needs = frozenset({"kfac"})

    def __init__(self) -> None:
        self._kfe: dict[str, KFE] = {}

    def _get(self, ctx, view) -> KFE:
        if view.node not in self._kfe:
            self._kfe[view.node] = decompose(ctx, view, self.damping)
        return self._kfe[view.node]

    def rows(self, ctx, view, W, unit, n):
        k = self._get(ctx, view)
        return unit_sums(torch.as_tensor((k.QS ** 2) @ k.row_imp), unit, n)

    def cols(self, ctx, view, W, unit, n):
        k = self._get(ctx, view)
        per_channel = (k.QA ** 2) @ k.col_imp  # (C,)
        return unit_sums(torch.as_tensor(np.repeat(per_channel, view.taps) / view.taps), unit, n)


def check_supported(budget) -> None:
    if budget.kind not in ("flops",):
        raise UserError("--criterion eigendamage plans against MACs: use --keep-flops")
