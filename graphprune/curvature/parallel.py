"""Data-parallel curvature statistics (graphprune.distributed: launched by torchrun or ``--workers N``).

Every rank runs the same mini-batches; each takes its share of every mini-batch, cut on the
accumulator's chunk boundaries (``distributed.shard_chunks``: a rank's rows are whole chunks of the
single-process run, so every chunk's contribution is computed from the same samples as there). The
sampled targets of the true Fisher come from per-sample seeds (curvature.data.SampleSeeds), so a
sample draws the same class whichever rank holds it. After the last batch every summed statistic
(A, the grouped convs' Ag, S, the Fisher diagonal, WoodTaylor's gradient sum, the sample counts) is
all-reduced once; the summed statistics are float64, so the sum over the ranks equals the
single-process sum over the same float32 chunk contributions (to the last bit in practice: the
partial sums are exact in float64 unless an entry's chunk contributions differ by more than 2^29 in
magnitude). Taylor squares each mini-batch's gradient, so its weight gradients are all-reduced after
every mini-batch (one flat all-reduce per batch), before the criterion sees them.

WoodFisher's block inverses are built by sequential Woodbury updates and cannot be summed over
ranks. Data-parallel, each rank sums the blocks' outer products Σ_n g_b g_bᵀ of its samples
(float64, the same memory as the inverses), these sums are all-reduced, and every rank inverts
λI + (1/m)Σ_n g_b g_bᵀ block by block (Cholesky), which is what the Woodbury updates compute (the
Woodbury identity is exact): equal to the single-process inverses up to float64 rounding. λ is
computed as the single-process run computes it, from the samples of its first Woodbury update.
"""
from __future__ import annotations

import torch

from .. import distributed as dp

#: the summed statistics of a LayerStats, all-reduced after the last batch
FIELDS = ("A", "Ag", "S", "fisher", "gsum")


class DataParallel:
    """Per-run state of a data-parallel statistics pass (one per ``collect``)."""

    def __init__(self, acc, device: str, lambda_samples: int) -> None:
        self.acc, self.device = acc, device
        self.fsum: dict[int, torch.Tensor] = {}  # id(LayerStats) -> (out·nb, cb, cb) Σ g_b g_bᵀ
        self.lam_sum: dict[int, float] = {}
        # λ is estimated on the calibration set's first LAMBDA_SAMPLES samples, as in one process
        self.first = min(acc.total, lambda_samples)

    # ---------------------------------------------------------------- Taylor
    def reduce_grads(self, tg) -> None:
        """Sum the weight gradients of one mini-batch over the ranks (a rank without rows in it
        contributes zeros); a gradient no rank has stays None."""
        params = list(tg.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        have = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype,
                            device=grads[0].device) if params else None
        if not params:
            return
        dp.all_reduce_sum(grads + [have], self.device)
        for p, g, h in zip(params, grads, have.tolist()):
            p.grad = g if h > 0 else None

    # ---------------------------------------------------------------- WoodFisher
    def block_sums(self, st, gs: torch.Tensor, first_index: int) -> None:
        """Add one chunk of per-sample gradients gs (k, out, L) to Σ g_b g_bᵀ of every block
        (samples first_index, first_index + 1, ... of the calibration set)."""
        lay = st.blocks
        k, out = gs.shape[0], gs.shape[1]
        key = id(st)
        head = max(0, min(k, self.first - first_index))
        if head:
            self.lam_sum[key] = self.lam_sum.get(key, 0.0) + float(gs[:head].double().pow(2).sum())
        G = lay.gather(gs.reshape(k * out, -1)).reshape(k, out * lay.nb, lay.cb).transpose(0, 1)  # (B, k, cb)
        if key not in self.fsum:
            self.fsum[key] = torch.zeros(out * lay.nb, lay.cb, lay.cb, dtype=torch.float64, device=gs.device)
        F = self.fsum[key]
        step = max(1, (1 << 22) // (lay.cb * max(k, lay.cb)))
        for s in range(0, G.shape[0], step):
            Gs = G[s:s + step].to(torch.float64)
            F[s:s + step].baddbmm_(Gs.transpose(1, 2), Gs)

    # ---------------------------------------------------------------- the one reduction
    def finish(self, stats: dict, total: int, damping: float, woodfisher_dtype) -> None:
        """All-reduce every summed statistic and count; build the WoodFisher inverses."""
        layers = list(stats.values())
        fields = FIELDS + ("fsum",)
        # which (layer, field) exist on some rank, with their shapes (a rank may have had no rows)
        meta = torch.zeros(len(layers), len(fields), 5, dtype=torch.float64)
        counts = torch.zeros(len(layers), 3, dtype=torch.float64)
        for i, st in enumerate(layers):
            for j, f in enumerate(fields):
                t = self.fsum.get(id(st)) if f == "fsum" else getattr(st, f)
                if t is not None:
                    meta[i, j, 0] = 1
                    meta[i, j, 1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.float64)
            counts[i] = torch.tensor([st.n, st.a_count, self.lam_sum.get(id(st), 0.0)], dtype=torch.float64)
        self._reduce_small([meta, counts])
        tensors = []
        dtypes = {"gsum": torch.float32}
        for i, st in enumerate(layers):
            st.n, st.a_count = int(round(float(counts[i, 0]))), int(round(float(counts[i, 1])))
            for j, f in enumerate(fields):
                present = float(meta[i, j, 0])
                if not present:
                    continue
                t = self.fsum.get(id(st)) if f == "fsum" else getattr(st, f)
                if t is None:
                    shape = [int(round(float(d) / present)) for d in meta[i, j, 1:] if d > 0]
                    t = torch.zeros(shape, dtype=dtypes.get(f, torch.float64), device=self.device)
                    if f == "fsum":
                        self.fsum[id(st)] = t
                    else:
                        setattr(st, f, t)
                tensors.append(t)
        dp.all_reduce_tensors(tensors, self.device)
        for i, st in enumerate(layers):
            F = self.fsum.pop(id(st), None)
            if F is None:
                continue
            lay = st.blocks
            out = F.shape[0] // lay.nb
            st.lam = max(damping * float(counts[i, 2]) / (self.first * out * lay.length), 1e-12)
            st.finv = _damped_inverse(F, st.lam, float(total)).to(woodfisher_dtype)

    def _reduce_small(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce CPU tensors on the run's backend (NCCL reduces CUDA tensors only)."""
        if not str(self.device).startswith("cuda"):
            dp.all_reduce_sum(tensors, self.device)
            return
        moved = [t.to(self.device) for t in tensors]
        dp.all_reduce_sum(moved, self.device)
        for t, m in zip(tensors, moved):
            t.copy_(m.cpu())


def _damped_inverse(F: torch.Tensor, lam: float, m: float, slab: int = 1 << 22) -> torch.Tensor:
    """In place: F (B, c, c) = Σ g gᵀ → (λI + F/m)⁻¹ per block (Cholesky; LU where rounding broke
    definiteness)."""
    c = F.shape[1]
    step = max(1, slab // (c * c))
    for s in range(0, F.shape[0], step):
        M = F[s:s + step]
        M.div_(m)
        M.diagonal(dim1=1, dim2=2).add_(lam)
        L, info = torch.linalg.cholesky_ex(M)
        inv = torch.cholesky_inverse(L)
        if bool(info.any()):
            bad = info != 0
            inv[bad] = torch.linalg.inv(M[bad])
        M.copy_(inv)
    return F
