"""Magnitude (L1/L2) with per-layer normalisation so one global ranking is meaningful."""
from __future__ import annotations

import numpy as np

from .base import Criterion, ScoringContext, accumulate


class Magnitude(Criterion):
    """score_c = Σ_members ‖W_member[c]‖_p / mean_i ‖W_member[i]‖_p over the member's own slices."""

    name = "magnitude"

    def __init__(self, p: int = 2) -> None:
        if p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        self.p = p
        self.name = "magnitude" if p == 2 else "magnitude-l1"

    def _norms(self, rows: np.ndarray) -> np.ndarray:
        return np.abs(rows).sum(axis=1) if self.p == 1 else np.sqrt((rows ** 2).sum(axis=1))

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        out = {}
        for g in ctx.trace.groups:
            if not g.prunable:
                continue
            s = np.zeros(g.size)
            for sl in ctx.slices(g, roles=("out", "in", "param")):
                n = sl.per_index(self._norms)
                mean = n.mean()
                if np.isfinite(mean) and mean > 0:
                    accumulate(g, sl, n / mean, s)
            out[g.id] = s
        return out


class Lossless(Criterion):
    """0 for units proven identically zero wherever a layer consumes them, +inf otherwise.

    The proof comes from the tracer's per-channel constant propagation: a channel whose weights
    and bias are zero, fed through ops with f(0) = 0 (or BN whose shift cancels, ...)."""

    name = "lossless"

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:
        tr = ctx.trace
        live = np.zeros(len(tr.roots), dtype=bool)
        for m in tr.members:
            if m.role == "in":
                nz = ~(m.vals == 0)  # NaN (unknown) counts as live
                live[tr.roots[m.ids[nz]]] = True
        return {g.id: np.where(live[g.units], np.inf, 0.0) for g in tr.groups if g.prunable}
