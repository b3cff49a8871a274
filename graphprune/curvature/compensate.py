"""Weight compensation after channel removal (METHODS §4, §6).

* layer-wise OBS (every criterion): a consumer that loses input columns J updates its remaining
  columns (and bias) with H = A, its damped input second moment (for a grouped convolution, each
  group's rows with that group's own A):
  δW = −W_J ([H⁻¹]_JJ)⁻¹ [H⁻¹]_J,:
* kron-obs additionally updates a producer's remaining rows with S:
  δW_rest = −[S⁻¹]_rest,I ([S⁻¹]_II)⁻¹ W_I
* woodfisher uses its own block inverses: in every block b of every row that holds removed
  columns Q_b, δw_b = −F_b⁻¹[:,Q_b] ([F_b⁻¹]_QbQb)⁻¹ w_Qb (other blocks are untouched); when Q_b is
  the whole block the system is still the damped F_b, so it stays well-posed; a bias-free layer's
  blocks hold the constant input's coordinate too (collect.block_layout), whose change is dropped
* woodtaylor, the same with the gradient term: δw_b = −F_b⁻¹ḡ_b − F_b⁻¹[:,Q_b] ([F_b⁻¹]_QbQb)⁻¹ v_Qb,
  v = w − F_b⁻¹ḡ_b (the constrained minimum of ḡᵀδw + ½δwᵀFδw, METHODS §6)

Returns new values for the touched initializers (ONNX layouts), to be written before rewriting,
so the pruned model and its masked original both carry the compensated weights.
"""
from __future__ import annotations

import numpy as np
import torch

from ..criteria.curvature import DTYPE, _slabs, block_newton, damped

METHODS = ("obs", "kron-obs", "woodfisher", "woodtaylor")


def _obs_update(W: torch.Tensor, Hinv: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """Remove columns J of W optimally for H⁻¹ (rows independent): returns the updated W."""
    if len(J) == 0:
        return W
    HJJ = Hinv[J][:, J]
    delta = -(W[:, J] @ torch.linalg.solve(HJJ, Hinv[J, :]))
    W = W + delta
    W[:, J] = 0.0
    return W


def _woodfisher_update(st, W: torch.Tensor, J: np.ndarray, taylor: bool = False) -> torch.Tensor:
    """Remove columns J (canonical, < L) of W (out, L) with every block's OBS update; blocks holding
    the same number of removed weights are solved together."""
    lay = st.blocks
    out = W.shape[0]
    finv = st.finv.view(out, lay.nb, lay.cb, lay.cb)
    idx, valid = lay.index()
    blk, pos = lay.locate()
    a = block_newton(st) if taylor else None
    v = W - a if taylor else W
    ab = lay.gather(a) if taylor else None  # (out, nb, cb)
    Wn = W.clone()
    by_size: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for b in np.unique(blk[J]).tolist():
        Q = pos[J][blk[J] == b]
        bs, qs = by_size.setdefault(len(Q), ([], []))
        bs.append(b)
        qs.append(Q)
    for s, (bs, qs) in by_size.items():
        for part in _slabs(len(bs), out * lay.cb * lay.cb):
            B = torch.as_tensor(bs[part])  # (G,)
            Q = torch.as_tensor(np.stack(qs[part]))  # (G, s) slots
            cols = idx[B[:, None], Q]  # (G, s) canonical columns
            F = finv[:, B].to(DTYPE)  # (out, G, cb, cb)
            H = torch.gather(torch.gather(F, 3, Q[None, :, None, :].expand(out, -1, lay.cb, -1)), 2,
                             Q[None, :, :, None].expand(out, -1, -1, s))  # (out, G, s, s)
            FQ = torch.gather(F, 3, Q[None, :, None, :].expand(out, -1, lay.cb, -1))  # (out, G, cb, s)
            x = torch.linalg.solve(H, v[:, cols].unsqueeze(-1))  # (out, G, s, 1)
            delta = -(FQ @ x).squeeze(-1)  # (out, G, cb)
            if taylor:
                delta -= ab[:, B]
            real = valid[B]  # (G, cb)
            Wn[:, idx[B][real]] += delta[:, real]
    Wn[:, torch.as_tensor(J)] = 0.0
    return Wn


def compensate(ctx, keep_fn, method: str = "obs", damping: float = 1e-3) -> dict[str, np.ndarray]:
    """Compensated weights for every layer touched by the removal described by ``keep_fn``."""
    tensors = ctx.trace.graph.tensors()
    members = {}
    for m in ctx.trace.members:
        if m.input_index == 1 and m.node in ctx.views and m.role in ("out", "in"):
            members[(m.node, m.role)] = m
    updates: dict[str, np.ndarray] = {}
    for node, view in ctx.views.items():
        st = ctx.stats.layers.get(node) if ctx.stats is not None else None
        if st is None or st.n == 0:
            continue
        m_in, m_out = members.get((node, "in")), members.get((node, "out"))
        cols_keep = np.repeat(keep_fn(m_in.ids), view.taps) if m_in is not None else np.ones(view.cols, bool)
        rows_keep = keep_fn(m_out.ids) if m_out is not None else np.ones(view.out, bool)
        if cols_keep.all() and (method != "kron-obs" or rows_keep.all()):
            continue
        w = np.asarray(tensors[view.weight].values)
        has_bias = view.bias is not None
        b = np.asarray(tensors[view.bias].values) if has_bias else None
        W = torch.as_tensor(view.canonical(w, b if has_bias else np.zeros(view.out)), dtype=DTYPE)
        J = torch.as_tensor(np.nonzero(~cols_keep)[0])
        idx = slice(None) if has_bias else slice(0, view.cols)  # without a bias there is no constant input
        if method in ("woodfisher", "woodtaylor"):
            if st.finv is None or (method == "woodtaylor" and st.gsum is None):
                from ..errors import UserError

                raise UserError(f"--compensate {method} needs the statistics of --criterion {method}")
            L = st.blocks.length  # cols + 1: a bias-free layer's constant column changes too, and is dropped
            if len(J):
                W[:, :L] = _woodfisher_update(st, W[:, :L], J.numpy(), taylor=method == "woodtaylor")
        else:
            if st.Ag is not None:  # grouped conv: each group's rows with that group's input factor
                groups = st.Ag.shape[0]
                rows = view.out // groups
                for g in range(groups):
                    A = damped(st.Ag[g].to(DTYPE) * groups / max(st.a_count, 1), damping)[idx, idx]
                    r = slice(g * rows, (g + 1) * rows)
                    W[r, idx] = _obs_update(W[r, idx].clone(), torch.linalg.inv(A), J)
            else:
                A = damped(st.A.to(DTYPE) / max(st.a_count, 1), damping)[idx, idx]
                W[:, idx] = _obs_update(W[:, idx].clone(), torch.linalg.inv(A), J)
            if method == "kron-obs" and not rows_keep.all():
                S = damped(st.S.to(DTYPE) / max(st.n, 1), damping)
                Sinv = torch.linalg.inv(S)
                W = _obs_update(W.T.clone(), Sinv, torch.as_tensor(np.nonzero(~rows_keep)[0])).T
        w_new, b_new = view.split(W.numpy() if has_bias else W[:, :view.cols].numpy(), w, has_bias)
        updates[view.weight] = w_new
        if has_bias:
            updates[view.bias] = b_new.astype(b.dtype).reshape(b.shape)
    return updates
