"""Stream curvature statistics over calibration batches (nothing but running sums is kept).

needs (declared by the criteria):
  "grads"        per-mini-batch weight gradients, handed to an on_batch callback (Taylor)
  "fisher_diag"  Σ_n g_n² of per-sample weight gradients g_n = Σ_t ds_t a_tᵀ (OBD)
  "kfac"         A = E[a aᵀ] (bias column included), S = E_n[Σ_t ds dsᵀ] (K-FAC, OBS compensation)
  "kfac_a"       A (and the grouped convs' Ag) only: layer-wise OBS compensation reads nothing else, and S
                 of a wide layer (a 6,625-class head: N·T·C² multiply-adds) can cost more than the network
  "woodfisher"   per diagonal block of at most ``block_size`` weights of a row (aligned on whole input
                 channels), the inverse of λI + (1/m) Σ_n g_b g_bᵀ by Woodbury updates (METHODS §6)
  "woodtaylor"   Σ_n g_n, the summed per-sample gradients (the mean gradient of WoodTaylor)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import log
from .data import CalibData, as_spec
from .layers import LayerView


#: the summed statistics (A, Ag, S, the Fisher diagonal) are float64: each chunk's float32
#: contribution adds to them exactly in practice, so a sum does not depend on the order of the chunks
#: (data-parallel ranks add up the same chunks as one process: curvature/parallel.py)
ACC_DTYPE = torch.float64


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
    #: WoodFisher: (out·nb, cb, cb) Woodbury-updated inverse of every diagonal block (row r's block b
    #: at r·nb + b), laid out by ``blocks``; float64 (see WOODFISHER_DTYPE)
    finv: torch.Tensor | None = None
    blocks: "BlockLayout | None" = None
    gsum: torch.Tensor | None = None  # (out, L) Σ_n g_n (WoodTaylor), L = cols + 1 (the constant input)
    lam: float = 0.0  # WoodFisher dampening actually used (one λ for the layer's blocks)
    n: int = 0


@dataclass
class Stats:
    layers: dict[str, LayerStats] = field(default_factory=dict)
    samples: int = 0
    loss: str = ""
    seconds: float = 0.0
    block_size: int | None = None  # WoodFisher block size used (None: one block per row)


#: The WoodFisher inverses are float64: a block's condition number reaches c/damping and beyond
#: (λ is relative to the layer's mean), and float32 Woodbury updates lose ~1e-7·λ⁻¹ per update, so
#: float32 inverses lose definiteness (random ResNet-18, c = 89, damping 1e-3, 32 samples: a third of
#: the float32 blocks had a non-positive eigenvalue, none in float64). Per-sample gradients, im2col
#: and the executor stay float32.
WOODFISHER_DTYPE = torch.float64


#: the largest default WoodFisher block (weights); smaller when --max-memory asks for it
DEFAULT_MAX_BLOCK = 1024
#: per-sample gradients applied together in one rank-k Woodbury update
WOODBURY_SAMPLES = 32
#: λ = damping × the layer's mean per-sample g² over the first LAMBDA_SAMPLES calibration samples
#: (the gradients' scale is not known before the Woodbury updates start). The per-row implementation
#: estimated it on its first update of 8 samples; the blocked one did on its first update of 32 for a
#: while, which moved the effective damping (0.78-1.04x the all-sample mean on the digits MobileNetV2
#: against 0.64-0.83x) and cost that net 2-4 test digits at --damping 0.1. With the same 8 samples,
#: whole-row blocks reproduce the per-row implementation's scores and updates at every damping
#: (benchmarks/results/criteria_digits_woodfisher.md).
LAMBDA_SAMPLES = 8


@dataclass(frozen=True)
class BlockLayout:
    """How one row of a layer's canonical weight (L = cols + 1: the input columns, then the constant
    input's column, see ``block_layout``) is split into contiguous diagonal blocks of the Fisher.
    Every row has the same split; blocks are padded to the largest size ``cb`` (padded slots have no
    gradient: they stay λ⁻¹·e and are never read)."""

    length: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def nb(self) -> int:
        return len(self.starts)

    @property
    def cb(self) -> int:
        return max(self.sizes)

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nb, cb) column index of every block slot (clipped for padding) and whether it is real."""
        pos = torch.arange(self.cb)
        starts, sizes = torch.tensor(self.starts), torch.tensor(self.sizes)
        valid = pos[None, :] < sizes[:, None]
        idx = torch.where(valid, starts[:, None] + pos[None, :], torch.zeros((), dtype=torch.long))
        return idx, valid

    def locate(self) -> tuple[np.ndarray, np.ndarray]:
        """For every column of the row: (its block, its slot in the block)."""
        blk = np.repeat(np.arange(self.nb), self.sizes)
        pos = np.concatenate([np.arange(n) for n in self.sizes])
        return blk, pos

    def gather(self, W: torch.Tensor) -> torch.Tensor:
        """(rows, L) → (rows, nb, cb), padded slots zero."""
        idx, valid = self.index()
        return W[:, idx] * valid.to(W.dtype)

    def scatter(self, Wb: torch.Tensor) -> torch.Tensor:
        """(rows, nb, cb) → (rows, L), inverse of ``gather`` on the real slots."""
        idx, valid = self.index()
        out = torch.zeros(Wb.shape[0], self.length, dtype=Wb.dtype)
        out[:, idx[valid]] = Wb[:, valid]
        return out


def block_layout(view: LayerView, block_size: int | None) -> BlockLayout:
    """Split a row (its input channels' kh·kw taps, then the constant input) into the fewest blocks
    of at most ``block_size`` weights, cut only between input channels when a channel fits in a block
    (so a channel's weights fall into one block), balanced in size. None or a block at least the row:
    one block per row (the dense per-row inverse).

    The constant input's coordinate is there for every layer, with a bias or not (METHODS: the patch
    with 1 appended, as the row-block implementation had it). A bias-free layer's OBS update is then
    the one with that coordinate free, and compensation drops its own change: the Schur complement of
    the block, which leaves out the Fisher's curvature along the row's constant direction. Without the
    coordinate (the exact update with the constant held at 0) the digits DenseNet at 30% MACs lost
    3-4 points at --damping 0.003 to 0.1 (91.1% against 95.3% at 0.1). At one λ the scores agree to
    1e-5 and the plan is the same; only the update differs: at 0.01 the two deepest bias-free 3x3
    convs moved by 5.6x and 10.3x their weight norm instead of 3.4x and 6.4x, and the loss was higher
    on the calibration samples themselves (cross-entropy 0.167 against 0.103), so this is no
    regularisation effect (benchmarks/results/criteria_digits_woodfisher.md). Layer-wise OBS with
    H = A is the opposite case: it matches the mean exactly and dropping the constant there costs
    10-40 points, so compensate.py keeps that update exact."""
    L = view.cols + 1
    if block_size is None or block_size >= L:
        return BlockLayout(L, (0,), (L,))
    c = max(1, int(block_size))
    unit = view.taps if c >= view.taps else 1  # a channel's taps, or single weights if a channel won't fit
    nunits = view.cols // unit
    extra = 1  # the constant input, appended to the last block
    nb = max(1, -(-L // c))
    while True:
        q, r = divmod(nunits, nb)
        counts = [q + 1] * r + [q] * (nb - r)
        sizes = [k * unit for k in counts]
        sizes[-1] += extra
        if max(sizes) <= c and min(sizes) > 0 or nb >= nunits + extra:
            break
        nb += 1
    sizes = [n for n in sizes if n > 0]
    starts = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    return BlockLayout(L, starts, tuple(sizes))


def woodfisher_bytes(view: LayerView, block_size: int | None) -> int:
    lay = block_layout(view, block_size)
    return WOODFISHER_DTYPE.itemsize * view.out * lay.nb * lay.cb * lay.cb


def _acc(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """total += part in ACC_DTYPE (a new float64 total on the first chunk)."""
    if total is None:
        return part.to(ACC_DTYPE)
    return total.add_(part)


#: rows of one block of the symmetric product m mᵀ (see _gram_into)
GRAM_BLOCK = 384


def _gram_into(A: torch.Tensor, m: torch.Tensor, first: bool = False) -> None:
    """A[:c, :c] += m mᵀ for m (c, K), or for m (N, c, T) the sum over n of m_n m_nᵀ (``first``:
    A[:c, :c] = ..., A not initialised), computing only the blocks on and above the diagonal (the
    others are their transposes): (nb + 1) / (2 nb) of the multiply-adds with nb blocks of about
    GRAM_BLOCK rows (on a ResNet-50 3x3 conv's 4,608 columns, 0.54 of them; about half the time)."""
    per_sample = m.dim() == 3
    c = m.shape[-2]
    nb = max(1, -(-c // GRAM_BLOCK))
    b = -(-c // nb)
    for i in range(0, c, b):
        i1 = min(i + b, c)
        mi = m[..., i:i1, :]
        for j in range(i, c, b):
            j1 = min(j + b, c)
            blk = torch.bmm(mi, m[:, j:j1].transpose(1, 2)).sum(0) if per_sample else mi @ m[j:j1].T
            _put(A[i:i1, j:j1], blk, first)
            if j != i:
                _put(A[j:j1, i:i1], blk.T, first)


def _put(dst: torch.Tensor, src: torch.Tensor, first: bool) -> None:
    """dst = src on a sum's first chunk (no zero fill of a new float64 sum beforehand; 0 + x is x
    exactly, so this is the same sum), else dst += src."""
    if first:
        dst.copy_(src)
    else:
        dst.add_(src)


class _Accumulator:
    def __init__(self, views: dict[str, LayerView], needs: set[str], total: int, damping: float,
                 chunk: int = 8, block_size: int | None = None) -> None:
        self.views, self.needs, self.total, self.damping, self.chunk = views, needs, total, damping, chunk
        self.stats = {name: LayerStats() for name in views}
        self._pending: dict[int, list[torch.Tensor]] = {}
        if "woodfisher" in needs or "woodtaylor" in needs:
            for name, view in views.items():
                self.stats[name].blocks = block_layout(view, block_size)
        self.batch_size = 1
        self.row0 = 0  # calibration index of the first row of the current (share of the) batch
        self.parallel = None  # curvature.parallel.DataParallel when the ranks split the batches
        self.missed: set[str] = set()  # layers whose output did not require a gradient (this forward)

    def record(self, node, x: torch.Tensor, y: torch.Tensor) -> None:
        view = self.views.get(node.name)
        if view is None:
            return
        if not y.requires_grad:
            self.missed.add(view.node)
            return
        x = x.detach()
        y.register_hook(lambda g, view=view, x=x: self._on_grad(view, x, g))

    def _on_grad(self, view: LayerView, x: torch.Tensor, g: torch.Tensor) -> None:
        st = self.stats[view.node]
        n = x.shape[0]
        needs = self.needs
        depthwise = view.groups > 1 and view.cols == view.taps
        # kfac_a: the input factor only (layer-wise OBS needs no S); a depthwise conv has no input
        # columns of its own to compensate, so OBS never reads its A
        want_a = "kfac" in needs or ("kfac_a" in needs and not depthwise)
        want_g = bool(needs & {"fisher_diag", "woodfisher", "woodtaylor"})
        wood = bool(needs & {"woodfisher", "woodtaylor"})
        for s in range(0, n, self.chunk):  # bounded memory: im2col of a few samples at a time
            ds = view.out_grads(g[s:s + self.chunk].to(torch.float32)) * self.batch_size  # per-sample loss
            # the input patches (N, groups, cols, T), without the constant input of the bias: its
            # entries (Σ a, the count; Σ_t ds) are added apart (no concatenated copy of the patches)
            a = view.patches(x[s:s + self.chunk]).to(torch.float32) if want_a or want_g else None
            if want_a:
                self._input_factor(st, view, a, grouped=a.shape[1] > 1 and not depthwise)
            if "kfac" in needs:
                d = ds.reshape(ds.shape[0], -1, ds.shape[3])  # (N, out, T)
                ss = torch.einsum("not,npt->op", d, d)
                st.S = _acc(st.S, ss)
            if want_g:
                k = ds.shape[0]
                gw = torch.einsum("ngot,ngit->ngoi", ds, a).reshape(k, view.out, view.cols)  # g_n = Σ_t ds_t a_tᵀ
                gb = ds.sum(3).reshape(k, view.out)  # the bias column: Σ_t ds_t
                gs = None
                if wood:
                    gs = torch.cat([gw, gb.unsqueeze(2)], 2)  # (N, out, cols+1), rows ordered by group
                if "fisher_diag" in needs:
                    first = st.fisher is None
                    if first:
                        st.fisher = torch.empty(view.out, view.cols + 1, dtype=ACC_DTYPE, device=ds.device)
                    _put(st.fisher[:, :view.cols], (gw.mul_(gw) if not wood else gw * gw).sum(0), first)
                    _put(st.fisher[:, view.cols], (gb * gb).sum(0), first)
                if "woodtaylor" in needs:
                    gsum = gs.sum(0)
                    st.gsum = gsum if st.gsum is None else st.gsum + gsum
                if wood:
                    if self.parallel is not None:  # ranks sum Σ g gᵀ per block, inverted after the reduction
                        self.parallel.block_sums(st, gs, self.row0 + s)
                    else:
                        self._queue(st, gs, last=s + self.chunk >= n)
            st.n += ds.shape[0]

    def _input_factor(self, st: LayerStats, view: LayerView, a: torch.Tensor, grouped: bool) -> None:
        """A += Σ [a; 1][a; 1]ᵀ over the chunk's samples, positions (and conv groups, which share A);
        ``grouped`` (a grouped conv that is not depthwise): each group's own factor into Ag too."""
        k, groups, c, t = a.shape
        if groups > 1:  # per sample: (groups, c, c) products, summed (one einsum over N·groups·T
            per = None  # copies the patches and sums ~1e6 float32 terms in a row: 9x slower, 1e-4 off)
            for i in range(k):
                p = torch.bmm(a[i], a[i].transpose(1, 2))
                per = p if per is None else per.add_(p)
            sums = a.sum((0, 3))  # (groups, c)
            if grouped:
                if st.Ag is None:
                    st.Ag = torch.zeros(groups, c + 1, c + 1, dtype=ACC_DTYPE, device=a.device)
                st.Ag[:, :c, :c].add_(per)
                st.Ag[:, :c, c].add_(sums)
                st.Ag[:, c, :c].add_(sums)
                st.Ag[:, c, c].add_(k * t)
            core, asum = per.sum(0), sums.sum(0)
        elif t >= 512:  # many positions a sample: per-sample products of the patches as they lie
            core, m = None, a[:, 0]  # (N, c, T)
            asum = m.sum((0, 2))
        else:
            core, m = None, a.permute(2, 0, 1, 3).reshape(c, -1)  # (c, N·T): a view for Gemm/MatMul inputs
            asum = m.sum(1)
        first = st.A is None
        if first:
            st.A = torch.empty(c + 1, c + 1, dtype=ACC_DTYPE, device=a.device)
            st.A[c, c] = 0
        if core is None:
            _gram_into(st.A, m, first)
        else:
            _put(st.A[:c, :c], core, first)
        _put(st.A[:c, c], asum, first)
        _put(st.A[c, :c], asum, first)
        st.A[c, c] += k * groups * t
        st.a_count += k * groups * t

    def _queue(self, st: LayerStats, gs: torch.Tensor, last: bool) -> None:
        """Per-sample gradients go into the Woodbury update WOODBURY_SAMPLES at a time (a batch's
        chunks are gathered first: each update is a pass over the layer's inverses, so fewer and
        wider updates are much faster), never more than that held."""
        buf = self._pending.setdefault(id(st), [])
        buf.append(gs)
        if last or sum(len(x) for x in buf) >= WOODBURY_SAMPLES:
            gs = torch.cat(buf) if len(buf) > 1 else buf[0]
            if st.finv is None:  # λ from the first LAMBDA_SAMPLES samples (the buffer holds them, in order)
                st.lam = max(self.damping * float(gs[:LAMBDA_SAMPLES].double().pow(2).mean()), 1e-12)
            self._woodbury(st, gs)
            buf.clear()

    def _woodbury(self, st: LayerStats, gs: torch.Tensor, slab: int = 1 << 22) -> None:
        """Woodbury updates of every block's F̂_b⁻¹ = (λI + (1/m) Σ_n g_b g_bᵀ)⁻¹ by one chunk of k
        per-sample gradients gs (k, out, L).

        The k samples are applied together with the rank-k form
        F⁻¹ ← F⁻¹ − U (m I + G U)⁻¹ Uᵀ, U = F⁻¹Gᵀ, which equals k successive rank-1 updates
        F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (m + gᵀF⁻¹g) exactly, in float64 (WOODFISHER_DTYPE), the update is written in place a slab of blocks at a time (temporaries
        stay O(k·c) per block). λ = damping × mean diagonal of the layer's empirical Fisher (1/m)Σ g²,
        estimated on the first LAMBDA_SAMPLES samples (the gradients' scale is not known before),
        shared by the layer's blocks (as the per-row implementation had it).
        """
        lay = st.blocks
        dt = WOODFISHER_DTYPE
        k, out = gs.shape[0], gs.shape[1]
        if k > max(8, lay.cb):  # a k×k system larger than the block costs more than it saves
            step = max(8, lay.cb)
            for s in range(0, k, step):
                self._woodbury(st, gs[s:s + step], slab)
            return
        G = lay.gather(gs.reshape(k * out, -1)).reshape(k, out * lay.nb, lay.cb).transpose(0, 1)  # (B, k, cb)
        if st.finv is None:
            st.finv = torch.zeros(out * lay.nb, lay.cb, lay.cb, dtype=dt, device=gs.device)
            st.finv.diagonal(dim1=1, dim2=2).fill_(1.0 / st.lam)
        m = float(self.total)
        eye = m * torch.eye(k, dtype=torch.float64, device=gs.device)
        step = max(1, slab // (lay.cb * lay.cb))
        for s in range(0, G.shape[0], step):
            F, Gs = st.finv[s:s + step], G[s:s + step].to(dt)
            U = torch.bmm(F, Gs.transpose(1, 2))  # (b, cb, k) = F⁻¹ gᵀ
            K = eye + torch.bmm(Gs.double(), U.double())  # (b, k, k), eigenvalues ≥ m
            # K is SPD: Cholesky inverse (batched solve with cb right-hand sides and batched inv of
            # small matrices take very slow paths in torch); LU where rounding broke definiteness
            L, info = torch.linalg.cholesky_ex(K)
            Kinv = torch.cholesky_inverse(L)
            if bool(info.any()):
                bad = info != 0
                Kinv[bad] = torch.linalg.inv(K[bad])
            V = torch.bmm(Kinv.to(dt), U.transpose(1, 2))  # (b, k, cb) = K⁻¹Uᵀ
            F.baddbmm_(U, V, alpha=-1.0)


def estimate_bytes(views: dict[str, LayerView], needs: set[str], chunk: int = 8, *,
                   weights_shared: bool = False, block_size: int | None = None) -> dict[str, int]:
    """Memory the statistics will hold (bytes), per kind, before anything is computed. "executor" is
    the PyTorch executor's gradients of the layer weights, plus its copy of the weights unless it
    shares the graph's arrays (``weights_shared``, on CPU). "woodfisher" is the block inverses at
    ``block_size`` (None: one block per output row)."""
    out = {"kfac": 0, "fisher_diag": 0, "woodfisher": 0, "executor": 0, "transient": 0}
    wood = needs & {"woodfisher", "woodtaylor"}
    for v in views.values():
        c = v.cols + 1
        out["executor"] += (1 if weights_shared else 2) * 4 * v.out * c
        if needs & {"kfac", "kfac_a"}:
            per_group = v.groups if v.groups > 1 and v.cols > v.taps else 0  # Ag of grouped convs
            out["kfac"] += ACC_DTYPE.itemsize * (c * c * (1 + per_group) + (v.out * v.out if "kfac" in needs else 0))
        if "fisher_diag" in needs:
            out["fisher_diag"] += ACC_DTYPE.itemsize * v.out * c
        if wood:
            out["woodfisher"] += woodfisher_bytes(v, block_size)
            if "woodtaylor" in needs:
                out["woodfisher"] += 4 * v.out * c  # Σ g
            # per-sample gradients and their blocked copy; one slab's float64 solve when scoring
            lay = block_layout(v, block_size)
            out["transient"] = max(out["transient"], 4 * WOODBURY_SAMPLES * v.out * (c + 2 * lay.nb * lay.cb),
                                   8 * 3 * min(v.out * lay.nb * lay.cb * lay.cb, 1 << 21))
        if "fisher_diag" in needs:
            out["transient"] = max(out["transient"], 4 * chunk * v.out * c * 2)
    return out


def default_block_size(views: dict[str, LayerView], needs: set[str], limit: int, *, chunk: int = 8,
                       weights_shared: bool = False, largest: int = DEFAULT_MAX_BLOCK) -> int:
    """The largest WoodFisher block size (≤ ``largest``) whose whole estimate takes at most half of
    ``limit`` bytes (the other half is for the forward/backward pass, whose activations the estimate
    does not count), else the largest that fits ``limit`` itself, so the criterion is refused only
    where no block size would do (then 1 is returned and the caller's check refuses). The inverses
    take about 4·params·c bytes."""
    def largest_fitting(budget: int) -> int | None:
        def fits(c: int) -> bool:
            return sum(estimate_bytes(views, needs, chunk, weights_shared=weights_shared,
                                      block_size=c).values()) <= budget

        hi = min(largest, max((v.cols + 1 for v in views.values()), default=1))
        if fits(hi):
            return hi
        lo = 1
        if not fits(lo):
            return None
        while hi - lo > 1:  # the estimate grows with c (up to the blocks' balancing)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    return largest_fitting(limit // 2) or largest_fitting(limit) or 1


def available_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _bytes_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def collect(tg, views: dict[str, LayerView], data: CalibData, loss_kind: str, needs: set[str], *,
            batch_size: int = 32, damping: float = 1e-3, seed: int = 0, on_batch=None,
            device: str = "cpu", block_size: int | None = None, micro: int | None = None) -> Stats:
    """Run forward/backward over the calibration set, accumulating what ``needs`` asks for
    (``block_size``: WoodFisher's diagonal blocks, None: one per output row). ``micro``: a model
    with a static batch runs each mini-batch in forward/backward passes of that many samples, each
    pass's loss still divided by the whole mini-batch, so gradients and statistics are those of the
    batched pass.

    Under torchrun (graphprune.distributed) every rank takes its share of each mini-batch and the
    sums are all-reduced at the end (curvature/parallel.py); the sampled targets come from
    per-sample seeds (data.SampleSeeds), so the result does not depend on the number of ranks."""
    from .. import distributed as dp
    from .data import SampleSeeds

    t0 = time.perf_counter()
    acc = _Accumulator(views, needs, len(data), damping, block_size=block_size)
    layer_needs = needs & {"kfac", "kfac_a", "fisher_diag", "woodfisher", "woodtaylor"}
    tg.recorder = acc.record if layer_needs else None
    spec = as_spec(loss_kind)
    # Only Taylor reads the weights' own gradients. Otherwise the backward pass needs the layers'
    # output gradients alone: the weights stop requiring gradients and the floating-point inputs
    # start to (autograd then skips every weight-gradient product: a third of a backward pass).
    # Where that leaves a recorded layer without a gradient (integer inputs such as token ids, a
    # non-differentiable path), the first forward is redone the usual way.
    trainable = [p for p in tg.parameters() if p.requires_grad]
    input_grads = "grads" not in needs and bool(layer_needs) and bool(trainable)
    parallel = dp.world_size() > 1
    if parallel:
        from .parallel import DataParallel

        acc.parallel = DataParallel(acc, device, LAMBDA_SAMPLES)
    n_batches = (len(data) + batch_size - 1) // batch_size
    log.progress("statistics", 0, n_batches)  # starts the clock for samples/s and the ETA
    seen = 0
    for k, (feeds, labels) in enumerate(data.batches(batch_size)):
        t_batch = time.perf_counter()
        n = len(next(iter(feeds.values())))
        acc.batch_size = n  # the loss is the mean over the whole mini-batch, whichever rank holds a row
        # ranks' shares start on whole chunks, and on whole static batches (``micro``)
        rows = dp.shard_chunks(n, math.lcm(acc.chunk, micro or 1)) if parallel else slice(0, n)
        tg.zero_grad(set_to_none=True)
        step = micro or max(rows.stop - rows.start, 1)
        for m0 in range(rows.start, rows.stop, step):
            part = slice(m0, min(rows.stop, m0 + step))
            acc.row0 = seen + part.start
            inputs = {name: torch.from_numpy(np.ascontiguousarray(v[part])).to(device) for name, v in feeds.items()}
            outs = _forward(tg, acc, inputs, trainable, input_grads)
            if input_grads and acc.missed:
                input_grads = False
                outs = _forward(tg, acc, inputs, trainable, False)
            lab = None if labels is None else torch.from_numpy(labels[part]).to(device)
            seeds = SampleSeeds(seed, range(seen + part.start, seen + part.stop))
            loss = spec.value(outs, lab, seeds, n)  # Σ over outputs, Σ over rows / n (data.LossSpec)
            loss.backward()
            del outs, loss
        if on_batch is not None:
            if parallel:
                acc.parallel.reduce_grads(tg)  # Taylor: the mini-batch gradient, summed over the ranks
            on_batch(tg)
        seen += n
        if k == 0:
            _estimate_line(views, needs, device, block_size, time.perf_counter() - t_batch, n, len(data))
        log.progress("statistics", k + 1, n_batches, items=seen, total_items=len(data))
    tg.recorder = None
    for p in trainable:
        p.requires_grad_(True)
    if parallel:
        acc.parallel.finish(acc.stats, len(data), damping, WOODFISHER_DTYPE)
    for st in acc.stats.values():
        if st.finv is not None:  # the updates leave rounding-level asymmetry: make every block symmetric
            step = max(1, (1 << 22) // (st.finv.shape[1] ** 2))
            for s in range(0, len(st.finv), step):
                F = st.finv[s:s + step]
                F.copy_((F + F.transpose(1, 2)) * 0.5)
    return Stats(acc.stats, len(data), str(spec), time.perf_counter() - t0)


def _forward(tg, acc: _Accumulator, inputs: dict, trainable: list, input_grads: bool):
    """The executor's forward pass, gradients through the inputs (``input_grads``) or the weights."""
    for p in trainable:
        p.requires_grad_(not input_grads)
    if input_grads:
        if not all(t.is_floating_point() for t in inputs.values()):
            acc.missed.add("(integer input)")
            return None
        inputs = {k: t.detach().requires_grad_(True) for k, t in inputs.items()}
    acc.missed = set()
    return tg(**inputs)


def _estimate_line(views, needs, device, block_size, first: float, first_n: int, total: int) -> None:
    """One stderr line after the first mini-batch: the memory the statistics will hold (estimated
    up front, as the --max-memory check does) and the time, extrapolated from the first batch (which
    includes one-off costs, so it errs long)."""
    from .. import distributed as dp

    kinds = sorted(needs & {"kfac", "kfac_a", "fisher_diag", "woodfisher", "woodtaylor", "grads"})
    mem = sum(estimate_bytes(views, needs, weights_shared=str(device).split(":")[0] == "cpu",
                             block_size=block_size).values())
    secs = first * total / max(first_n, 1)
    procs = f" on {dp.world_size()} processes" if dp.world_size() > 1 else ""
    log.info(f"statistics ({', '.join(kinds)}) over {total} samples{procs}: about {_bytes_text(mem)}; "
             f"first batch {first:.1f} s, about {log.duration(secs)} in all")
