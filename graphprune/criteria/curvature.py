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
        self._sum: dict[int, np.ndarray] = {}
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

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        return {g.id: self._sum.get(g.id, np.zeros(g.size)) / max(self._batches, 1)
                for g in ctx.trace.groups if g.prunable}


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


class WoodFisher(_LayerwiseCriterion):
    """Structured OBS with a blockwise empirical-Fisher inverse (one block per output row, built by
    Woodbury rank-1 updates): ρ_Q = ½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q per row, summed over rows."""

    name = "woodfisher"
    needs = frozenset({"woodfisher"})

    def _finv(self, ctx, view) -> torch.Tensor:
        return ctx.stats.layers[view.node].finv.to(DTYPE)

    def rows(self, ctx, view, W, unit, n):
        finv = self._finv(ctx, view)
        rho = 0.5 * (W * torch.linalg.solve(finv, W.unsqueeze(-1)).squeeze(-1)).sum(1)
        return unit_sums(rho, unit, n)

    def cols(self, ctx, view, W, unit, n):
        finv = self._finv(ctx, view)
        out = torch.zeros(n, dtype=DTYPE)
        for _, (ids, idx) in _unit_index_blocks(unit).items():
            Fb = finv[:, idx[:, :, None], idx[:, None, :]]  # (rows, units, s, s)
            wb = W[:, idx]  # (rows, units, s)
            q = (wb * torch.linalg.solve(Fb, wb.unsqueeze(-1)).squeeze(-1)).sum(-1)  # (rows, units)
            out[ids] += 0.5 * q.sum(0)
        return out


CURVATURE = {c.name: c for c in (Taylor, FisherOBD, KronOBD, KronOBS, WoodFisher)}
