"""Stream curvature statistics over calibration batches (nothing but running sums is kept).

needs (declared by the criteria):
  "grads"        per-mini-batch weight gradients, handed to an on_batch callback (Taylor)
  "fisher_diag"  Σ_n g_n² of per-sample weight gradients g_n = Σ_t ds_t a_tᵀ (OBD)
  "kfac"         A = E[a aᵀ] (bias column included), S = E_n[Σ_t ds dsᵀ] (K-FAC, OBS compensation)
  "kfac_a"       A (and the grouped convs' Ag) only: layer-wise OBS compensation reads nothing else, and S
                 of a wide layer (a 6,625-class head: N·T·C² multiply-adds) can cost more than the network
  "woodfisher"   per output row, the inverse of λI + (1/m) Σ_n g g ᵀ by Woodbury rank-1 updates
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import log
from .data import CalibData, as_spec
from .layers import LayerView


@dataclass
class LayerStats:
    A: torch.Tensor | None = None  # (cols+1, cols+1) summed, divide by a_count
    a_count: int = 0
    #: grouped convolutions: the input factor of each conv group (groups, cols+1, cols+1) summed, divide
    #: by a_count / groups; layer-wise OBS needs it (a row only sees its own group's inputs), while the
    #: K-FAC criteria share A over the groups
    Ag: torch.Tensor | None = None
    S: torch.Tensor | None = None  # (out, out) summed over samples, divide by n
    fisher: torch.Tensor | None = None  # (out, cols+1) Σ_n g_n²
    finv: torch.Tensor | None = None  # (out, cols+1, cols+1) Woodbury-updated inverse
    lam: float = 0.0  # WoodFisher dampening actually used
    n: int = 0


@dataclass
class Stats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    samples: int = 0
    loss: str = ""
    seconds: float = 0.0


def _augment(a: torch.Tensor) -> torch.Tensor:
    """Append the constant-1 input of the bias: (N, g, cols+1, T)."""
    ones = torch.ones(a.shape[0], a.shape[1], 1, a.shape[3], dtype=a.dtype, device=a.device)
    return torch.cat([a, ones], dim=2)


def _per_sample_grads(a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """g_n = Σ_t ds_t a_tᵀ for every sample: (N, out, cols+1), rows ordered by group."""
    g = torch.einsum("ngot,ngit->ngoi", ds, a)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class _Accumulator:
    def __init__(self, views: dict[str, LayerView], needs: set[str], total: int, damping: float,
                 chunk: int = 8) -> None:
        self.views, self.needs, self.total, self.damping, self.chunk = views, needs, total, damping, chunk
        self.stats = {name: LayerStats() for name in views}
        self.batch_size = 1

    def record(self, node, x: torch.Tensor, y: torch.Tensor) -> None:
        view = self.views.get(node.name)
        if view is None or not y.requires_grad:
            return
        x = x.detach()
        y.register_hook(lambda g, view=view, x=x: self._on_grad(view, x, g))

    def _on_grad(self, view: LayerView, x: torch.Tensor, g: torch.Tensor) -> None:
        st = self.stats[view.node]
        n = x.shape[0]
        for s in range(0, n, self.chunk):  # bounded memory: im2col of a few samples at a time
            a = _augment(view.patches(x[s:s + self.chunk]).to(torch.float32))
            ds = view.out_grads(g[s:s + self.chunk].to(torch.float32)) * self.batch_size  # per-sample loss
            if self.needs & {"kfac", "kfac_a"}:  # kfac_a: the input factor only (layer-wise OBS needs no S)
                if a.shape[1] > 1 and view.cols > view.taps:  # grouped, not depthwise (nothing to compensate)
                    aag = torch.einsum("ngit,ngjt->gij", a, a)
                    st.Ag = aag if st.Ag is None else st.Ag + aag
                    aa = aag.sum(0)
                else:
                    aa = torch.einsum("ngit,ngjt->ij", a, a)
                st.A = aa if st.A is None else st.A + aa
                st.a_count += a.shape[0] * a.shape[1] * a.shape[3]
            if "kfac" in self.needs:
                d = ds.reshape(ds.shape[0], -1, ds.shape[3])  # (N, out, T)
                ss = torch.einsum("not,npt->op", d, d)
                st.S = ss if st.S is None else st.S + ss
            if "fisher_diag" in self.needs or "woodfisher" in self.needs:
                gs = _per_sample_grads(a, ds)
                if "fisher_diag" in self.needs:
                    sq = gs.pow(2).sum(0)
                    st.fisher = sq if st.fisher is None else st.fisher + sq
                if "woodfisher" in self.needs:
                    self._woodbury(st, gs)
            st.n += ds.shape[0]

    def _woodbury(self, st: LayerStats, gs: torch.Tensor) -> None:
        """Woodbury updates of F̂⁻¹ = (λI + (1/m) Σ g gᵀ)⁻¹, every output row's block at once.

        The k samples of a chunk are applied together with the rank-k form
        F⁻¹ ← F⁻¹ − F⁻¹Gᵀ (m I + G F⁻¹ Gᵀ)⁻¹ G F⁻¹, which equals k successive rank-1 updates
        F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (m + gᵀF⁻¹g) exactly. λ = damping × mean diagonal of the
        empirical Fisher, estimated on the first chunk (the gradients' scale is not known before).
        """
        G = gs.to(torch.float64).transpose(0, 1)  # (out, k, c)
        if st.finv is None:
            out, c = G.shape[0], G.shape[2]
            st.lam = max(self.damping * float(G.pow(2).mean()), 1e-12)
            st.finv = torch.eye(c, dtype=torch.float64, device=gs.device).expand(out, c, c).clone() / st.lam
        m = float(self.total)
        U = torch.einsum("oij,okj->oki", st.finv, G)  # F⁻¹ gᵀ per sample
        K = m * torch.eye(G.shape[1], dtype=torch.float64, device=G.device) + torch.einsum("oki,oli->okl", G, U)
        st.finv -= torch.einsum("oki,okl->oil", U, torch.linalg.solve(K, U))


def estimate_bytes(views: dict[str, LayerView], needs: set[str], chunk: int = 8, *,
                   weights_shared: bool = False) -> dict[str, int]:
    """Memory the statistics will hold (bytes), per kind, before anything is computed. "executor" is
    the PyTorch executor's gradients of the layer weights, plus its copy of the weights unless it
    shares the graph's arrays (``weights_shared``, on CPU)."""
    out = {"kfac": 0, "fisher_diag": 0, "woodfisher": 0, "executor": 0, "transient": 0}
    for v in views.values():
        c = v.cols + 1
        out["executor"] += (1 if weights_shared else 2) * 4 * v.out * c
        if "kfac" in needs:
            per_group = v.groups if v.groups > 1 and v.cols > v.taps else 0  # Ag of grouped convs
            out["kfac"] += 4 * (c * c * (1 + per_group) + v.out * v.out)
        if "fisher_diag" in needs:
            out["fisher_diag"] += 4 * v.out * c
        if "woodfisher" in needs:
            out["woodfisher"] += 8 * v.out * c * c * 3  # the inverse plus two update temporaries
        if needs & {"fisher_diag", "woodfisher"}:
            out["transient"] = max(out["transient"], 4 * chunk * v.out * c * 2)
    return out


def available_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def collect(tg, views: dict[str, LayerView], data: CalibData, loss_kind: str, needs: set[str], *,
            batch_size: int = 32, damping: float = 1e-3, seed: int = 0, on_batch=None,
            device: str = "cpu") -> Stats:
    """Run forward/backward over the calibration set, accumulating what ``needs`` asks for."""
    t0 = time.perf_counter()
    acc = _Accumulator(views, needs, len(data), damping)
    layer_needs = needs & {"kfac", "kfac_a", "fisher_diag", "woodfisher"}
    tg.recorder = acc.record if layer_needs else None
    gen = torch.Generator().manual_seed(seed)
    spec = as_spec(loss_kind)
    n_batches = (len(data) + batch_size - 1) // batch_size
    log.progress("statistics", 0, n_batches)  # starts the clock for samples/s and the ETA
    seen = 0
    for k, (feeds, labels) in enumerate(data.batches(batch_size)):
        acc.batch_size = len(next(iter(feeds.values())))
        inputs = {name: torch.from_numpy(np.ascontiguousarray(v)).to(device) for name, v in feeds.items()}
        tg.zero_grad(set_to_none=True)
        outs = tg(**inputs)
        lab = None if labels is None else torch.from_numpy(labels).to(device)
        loss = spec.value(outs, lab, gen, acc.batch_size)  # Σ over outputs, mean over samples (data.LossSpec)
        loss.backward()
        if on_batch is not None:
            on_batch(tg)
        seen += acc.batch_size
        log.progress("statistics", k + 1, n_batches, items=seen, total_items=len(data))
    tg.recorder = None
    return Stats(acc.stats, len(data), str(spec), time.perf_counter() - t0)
