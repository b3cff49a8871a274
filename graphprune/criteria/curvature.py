"""Curvature criteria (METHODS §2-§6). Every score estimates the loss increase of removing a unit,
summed over the group's members, so groups rank globally without normalisation.

Each layer is seen through its canonical (out × in'+1) weight; a group touches a layer through its
rows (the layer produces the group's channels) and/or its columns (the layer consumes them).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Criterion, ScoringContext

DTYPE = torch.float64


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=DTYPE)


def _onehot(unit: np.ndarray, n: int) -> tuple[np.ndarray, torch.Tensor]:
    sel = np.nonzero(unit >= 0)[0]
    U = torch.zeros(len(sel), n, dtype=DTYPE)
    U[torch.arange(len(sel)), torch.as_tensor(unit[sel])] = 1.0
    return sel, U


def unit_sums(per_index: torch.Tensor, unit: np.ndarray, n: int) -> torch.Tensor:
    """Σ of per-index values over the indices of each unit u < n (indices with unit -1 are skipped)."""
    sel = np.nonzero(unit >= 0)[0]
    out = torch.zeros(n, dtype=DTYPE)
    out.index_add_(0, torch.as_tensor(unit[sel]), per_index.to(DTYPE)[torch.as_tensor(sel)])
    return out


def block_sums(P: torch.Tensor, unit: np.ndarray, n: int) -> torch.Tensor:
    """Σ_{i,j in unit u} P_ij for every unit u < n."""
    sel, U = _onehot(unit, n)
    if not len(sel):
        return torch.zeros(n, dtype=DTYPE)
    Ps = P[torch.as_tensor(sel)][:, torch.as_tensor(sel)]
    return ((Ps @ U) * U).sum(0)


def _unit_index_blocks(unit: np.ndarray):
    """Units grouped by how many indices they own: {size: (unit ids, index matrix)}."""
    by_unit: dict[int, list[int]] = {}
    for i, u in enumerate(unit.tolist()):
        if u >= 0:
            by_unit.setdefault(u, []).append(i)
    by_size: dict[int, tuple[list[int], list[list[int]]]] = {}
    for u, idx in by_unit.items():
        ids, mats = by_size.setdefault(len(idx), ([], []))
        ids.append(u)
        mats.append(idx)
    return {s: (torch.as_tensor(ids), torch.as_tensor(m)) for s, (ids, m) in by_size.items()}


def block_trace_solve(P: torch.Tensor, Q: torch.Tensor, unit: np.ndarray, n: int) -> torch.Tensor:
    """tr(P_uu Q_uu⁻¹) for every unit u (structured OBS: P = W A Wᵀ blocks, Q = inverse-factor blocks)."""
    out = torch.zeros(n, dtype=DTYPE)
    for _, (ids, idx) in _unit_index_blocks(unit).items():
        Pb = P[idx[:, :, None], idx[:, None, :]]
        Qb = Q[idx[:, :, None], idx[:, None, :]]
        out[ids] += torch.linalg.solve(Qb, Pb).diagonal(dim1=-2, dim2=-1).sum(-1)
    return out


def damped(M: torch.Tensor, lam: float) -> torch.Tensor:
    """M + λ·mean(diag M)·I (relative damping; an absolute floor keeps all-zero factors invertible)."""
    d = float(M.diagonal().mean()) if M.numel() else 0.0
    return M + (lam * d + 1e-12) * torch.eye(M.shape[0], dtype=M.dtype)


class _LayerwiseCriterion(Criterion):
    """Shared loop: for each prunable group, each layer it touches, add row and column terms."""

    damping = 1e-3
    curvature = True

    def weights(self, ctx: ScoringContext, view) -> torch.Tensor:
        tensors = ctx.trace.graph.tensors()
        w = np.asarray(tensors[view.weight].values)
        b = np.asarray(tensors[view.bias].values) if view.bias else np.zeros(view.out)
        return _t(view.canonical(w, b))

    def rows(self, ctx, view, W, unit, n) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def cols(self, ctx, view, W, unit, n) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _memo(self, key, fn):
        """Per-layer quantities (weights, damped factors, inverses) are computed once per score()."""
        memo = self.__dict__.setdefault("_memo_store", {})
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        out = {}
        self._memo_store = {}
        for g in ctx.trace.groups:
            if not g.prunable:
                continue
            s = torch.zeros(g.size, dtype=DTYPE)
            for view, rows, cols in ctx.layer_units(g):
                if view.node not in ctx.stats.layers or ctx.stats.layers[view.node].n == 0:
                    continue
                W = self._memo((view.node, "W"), lambda: self.weights(ctx, view))
                if rows is not None:
                    s += self.rows(ctx, view, W, rows, g.size)
                if cols is not None:
                    s += self.cols(ctx, view, W, cols, g.size)
            out[g.id] = s.numpy()
        self._memo_store = {}
        return out

    # factors ---------------------------------------------------------------------
    def A(self, ctx, view) -> torch.Tensor:
        st = ctx.stats.layers[view.node]
        return self._memo((view.node, "A"), lambda: damped(st.A.to(DTYPE) / max(st.a_count, 1), self.damping))

    def S(self, ctx, view) -> torch.Tensor:
        st = ctx.stats.layers[view.node]
        return self._memo((view.node, "S"), lambda: damped(st.S.to(DTYPE) / max(st.n, 1), self.damping))

    def Ainv(self, ctx, view) -> torch.Tensor:
        return self._memo((view.node, "Ainv"), lambda: torch.linalg.inv(self.A(ctx, view)))

    def Sinv(self, ctx, view) -> torch.Tensor:
        return self._memo((view.node, "Sinv"), lambda: torch.linalg.inv(self.S(ctx, view)))


class Taylor(_LayerwiseCriterion):
    """Molchanov 2019: a gate on each unit where layers consume it; I = (∂L/∂z)² per mini-batch,
    averaged over mini-batches. ∂L/∂z = Σ over the consumed weight slices of w·∂L/∂w."""

    name = "taylor"
    needs = frozenset({"grads"})

    def __init__(self) -> None:
        self._sum: dict[int, np.ndarray] = {}  # Σ_b (∂L_b/∂z)²
        self._lin: dict[int, np.ndarray] = {}  # Σ_b ∂L_b/∂z
        self._batches = 0

    def on_batch(self, ctx: ScoringContext, tg) -> None:
        self._batches += 1
        grads: dict[str, torch.Tensor] = {}
        for g in ctx.trace.groups:
            if not g.prunable:
                continue
            gate = torch.zeros(g.size, dtype=DTYPE)
            for view, _, cols in ctx.layer_units(g):
                if cols is None:
                    continue
                if view.node not in grads:
                    p = tg.param(view.weight)
                    if p.grad is None:
                        continue
                    wg = (p.detach() * p.grad).to(DTYPE).cpu().numpy()
                    grads[view.node] = _t(view.canonical(wg))
                gate += unit_sums(grads[view.node].sum(0), cols, g.size)
            self._sum[g.id] = self._sum.get(g.id, 0) + (gate ** 2).numpy()
            self._lin[g.id] = self._lin.get(g.id, 0) + gate.numpy()

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        return {g.id: self._sum.get(g.id, np.zeros(g.size)) / max(self._batches, 1)
                for g in ctx.trace.groups if g.prunable}


class TaylorSO(Taylor):
    """Molchanov 2019's second-order variant I⁽²⁾ (METHODS §2): the gate's loss change to second
    order, ΔL_b ≈ −∂L_b/∂z + ½ ∂²L/∂z², with ∂²L/∂z² = w_Sᵀ H_S w_S taken diagonal from the Fisher
    of per-sample gradients (the fisher criterion's statistics): h = ½ Σ_{i∈S} F_ii w_i² over the
    same consumed slices S as the gate. I⁽²⁾ = (∂L_b/∂z − h)² per mini-batch, averaged over the
    mini-batches like taylor's I⁽¹⁾ (for one mini-batch, its square root is |ΔL|'s estimate)."""

    name = "taylor2"
    needs = frozenset({"grads", "fisher_diag"})

    def curvature_term(self, ctx: ScoringContext, g) -> np.ndarray:
        """h = ½ Σ F_ii w_i² over the unit's consumed weights (OBD's column terms)."""
        h = torch.zeros(g.size, dtype=DTYPE)
        for view, _, cols in ctx.layer_units(g):
            st = ctx.stats.layers.get(view.node) if ctx.stats is not None else None
            if cols is None or st is None or st.fisher is None or st.n == 0:
                continue
            W = self._memo((view.node, "W"), lambda: self.weights(ctx, view))
            h += unit_sums((0.5 * st.fisher.to(DTYPE) / st.n * W ** 2)[:, :-1].sum(0), cols, g.size)
        return h.numpy()

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        self._memo_store = {}
        b = max(self._batches, 1)
        out = {}
        for g in ctx.trace.groups:
            if not g.prunable:
                continue
            h = self.curvature_term(ctx, g)
            sq, lin = self._sum.get(g.id, np.zeros(g.size)), self._lin.get(g.id, np.zeros(g.size))
            out[g.id] = np.maximum((sq - 2 * h * lin) / b + h * h, 0.0)  # mean_b (d_b − h)², expanded
        self._memo_store = {}
        return out


class FisherOBD(_LayerwiseCriterion):
    """OBD with the diagonal Fisher from per-sample gradients: ΔL = ½ Σ_{i∈S_c} F_ii w_i²."""

    name = "fisher"
    needs = frozenset({"fisher_diag"})

    def _terms(self, ctx, view, W):
        st = ctx.stats.layers[view.node]
        return 0.5 * st.fisher.to(DTYPE) / max(st.n, 1) * W ** 2

    def rows(self, ctx, view, W, unit, n):
        return unit_sums(self._terms(ctx, view, W).sum(1), unit, n)

    def cols(self, ctx, view, W, unit, n):
        return unit_sums(self._terms(ctx, view, W)[:, :-1].sum(0), unit, n)


class KronOBD(_LayerwiseCriterion):
    """K-FAC OBD: rows ½ tr(S_II W_I A W_Iᵀ), columns ½ tr(S W_J A_JJ W_Jᵀ)."""

    name = "kron-obd"
    needs = frozenset({"kfac"})

    def rows(self, ctx, view, W, unit, n):
        M = W @ self.A(ctx, view) @ W.T
        return 0.5 * block_sums(self.S(ctx, view) * M, unit, n)

    def cols(self, ctx, view, W, unit, n):
        Wc = W[:, :-1]
        N = Wc.T @ self.S(ctx, view) @ Wc
        return 0.5 * block_sums(self.A(ctx, view)[:-1, :-1] * N, unit, n)


class KronOBS(_LayerwiseCriterion):
    """K-FAC OBS: rows ½ tr(W_I A W_Iᵀ ([S⁻¹]_II)⁻¹), columns ½ tr(S W_J ([A⁻¹]_JJ)⁻¹ W_Jᵀ)."""

    name = "kron-obs"
    needs = frozenset({"kfac"})

    def rows(self, ctx, view, W, unit, n):
        M = W @ self.A(ctx, view) @ W.T
        return 0.5 * block_trace_solve(M, self.Sinv(ctx, view), unit, n)

    def cols(self, ctx, view, W, unit, n):
        Wc = W[:, :-1]
        N = Wc.T @ self.S(ctx, view) @ Wc
        Ainv = self.Ainv(ctx, view)[:-1, :-1]
        return 0.5 * block_trace_solve(N, Ainv, unit, n)


def _slabs(n: int, per_item: int, budget: int = 1 << 21):
    """Ranges over n items of ``per_item`` float64 values each, about ``budget`` values per range."""
    step = max(1, budget // max(per_item, 1))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def block_newton(st) -> torch.Tensor:
    """F_b⁻¹ ḡ_b for every block (WoodTaylor's Newton step, ḡ = the mean per-sample gradient):
    (out, L) in the canonical layout."""
    lay = st.blocks
    out = st.gsum.shape[0]
    gb = lay.gather(st.gsum.to(DTYPE) / max(st.n, 1)).reshape(out * lay.nb, lay.cb)
    a = torch.empty_like(gb)
    for sl in _slabs(len(gb), lay.cb * lay.cb):
        a[sl] = torch.bmm(st.finv[sl].to(DTYPE), gb[sl].unsqueeze(-1)).squeeze(-1)
    return lay.scatter(a.reshape(out, lay.nb, lay.cb))


def unit_block_pairs(lay, unit: np.ndarray):
    """A column unit's weights inside each block it touches: {size s: (unit ids (P,), blocks (P,),
    slots (P, s))}, from the canonical column units (length cols, -1: not this group)."""
    blk, pos = lay.locate()
    pairs: dict[tuple[int, int], list[int]] = {}
    for i, u in enumerate(unit.tolist()):
        if u >= 0:
            pairs.setdefault((u, int(blk[i])), []).append(int(pos[i]))
    by_size: dict[int, tuple[list, list, list]] = {}
    for (u, b), slots in pairs.items():
        ids, bs, ss = by_size.setdefault(len(slots), ([], [], []))
        ids.append(u)
        bs.append(b)
        ss.append(slots)
    return {s: (torch.as_tensor(i), torch.as_tensor(b), torch.as_tensor(p)) for s, (i, b, p) in by_size.items()}


class WoodFisher(_LayerwiseCriterion):
    """Structured OBS with a block-diagonal empirical-Fisher inverse (METHODS §6): every row of the
    canonical weight is split into blocks of at most ``Stats.block_size`` weights (aligned on whole
    input channels), each block's F_b⁻¹ built by Woodbury updates. A unit whose weights Q fall into
    blocks b scores ρ = Σ_b ½ w_Qbᵀ ([F_b⁻¹]_QbQb)⁻¹ w_Qb (a whole block: ½ w_bᵀ F_b w_b)."""

    name = "woodfisher"
    needs = frozenset({"woodfisher"})

    def target(self, ctx, view, W) -> torch.Tensor:
        """The vector the constraint moves: w (WoodTaylor: w − F⁻¹ḡ)."""
        return W

    def _v(self, ctx, view, W) -> torch.Tensor:
        st = ctx.stats.layers[view.node]
        return self._memo((view.node, "v"), lambda: self.target(ctx, view, W[:, :st.blocks.length]))

    def rows(self, ctx, view, W, unit, n):
        st = ctx.stats.layers[view.node]
        lay = st.blocks
        vb = lay.gather(self._v(ctx, view, W)).reshape(-1, lay.cb)  # (out·nb, cb)
        rho = torch.empty(len(vb), dtype=DTYPE)
        for sl in _slabs(len(vb), lay.cb * lay.cb):
            x = torch.linalg.solve(st.finv[sl].to(DTYPE), vb[sl].unsqueeze(-1)).squeeze(-1)
            rho[sl] = 0.5 * (vb[sl] * x).sum(-1)
        return unit_sums(rho.reshape(view.out, lay.nb).sum(1), unit, n)

    def cols(self, ctx, view, W, unit, n):
        st = ctx.stats.layers[view.node]
        lay = st.blocks
        finv = st.finv.view(view.out, lay.nb, lay.cb, lay.cb)
        vb = lay.gather(self._v(ctx, view, W))  # (out, nb, cb)
        out = torch.zeros(n, dtype=DTYPE)
        for s, (ids, bs, slots) in unit_block_pairs(lay, unit).items():
            for sl in _slabs(len(ids), view.out * s * s):
                b, p = bs[sl], slots[sl]
                H = finv[:, b[:, None, None], p[:, :, None], p[:, None, :]].to(DTYPE)  # (out, P, s, s)
                w = vb[:, b[:, None], p]  # (out, P, s)
                q = (w * torch.linalg.solve(H, w.unsqueeze(-1)).squeeze(-1)).sum(-1)  # (out, P)
                out.index_add_(0, ids[sl], 0.5 * q.sum(0))
        return out


class WoodTaylor(WoodFisher):
    """WoodFisher not at a minimum (METHODS §6): ΔL = ḡᵀδw + ½ δwᵀFδw minimised under w_Q + δw_Q = 0
    in each touched block gives −½ ḡ_bᵀF_b⁻¹ḡ_b + ½ v_Qᵀ([F_b⁻¹]_QQ)⁻¹ v_Q with v = w − F_b⁻¹ḡ_b.
    The first term is the Newton step's gain, available without removing anything, so the score is
    the loss increase over that: ρ = Σ_b ½ v_Qbᵀ([F_b⁻¹]_QbQb)⁻¹ v_Qb. ḡ is the mean of the same
    per-sample gradients the inverse is built from."""

    name = "woodtaylor"
    needs = frozenset({"woodfisher", "woodtaylor"})

    def target(self, ctx, view, W):
        return W - block_newton(ctx.stats.layers[view.node])


CURVATURE = {c.name: c for c in (Taylor, TaylorSO, FisherOBD, KronOBD, KronOBS, WoodFisher, WoodTaylor)}
