"""Calibration data and the loss whose curvature the criteria estimate."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..calib import load_npz, match_inputs
from ..errors import UserError
from ..runtime import random_inputs, static_batch

LOSSES = ("auto", "labels", "true-fisher", "empirical-fisher", "gauss-newton", "categorical", "bernoulli")
#: the loss kinds of one output (a LossSpec part); "true-fisher" is the classifier-logits categorical
#: over the flattened output (N x C), "categorical" one per position along given class axes
_TINY = 1e-30


class SampleSeeds:
    """The random draws of a mini-batch (sampled classes of the true Fisher, Bernoulli outcomes,
    Gauss-Newton targets), one stream per calibration sample: sample ``i`` of the calibration set
    draws from a generator seeded by (seed, output, i). What a sample draws therefore does not depend
    on the mini-batch size nor on which process handles it: the data-parallel statistics
    (graphprune.distributed) equal the single-process ones."""

    def __init__(self, seed: int, index) -> None:
        self.seed = int(seed)
        self.index = [int(i) for i in index]

    def __len__(self) -> int:
        return len(self.index)

    def _gens(self, part: int):
        for i in self.index:
            state = np.random.SeedSequence([self.seed, int(part), i]).generate_state(1, np.uint64)[0]
            yield torch.Generator().manual_seed(int(state))

    def uniform(self, part: int, per_sample: int) -> torch.Tensor:
        """(samples * per_sample,) float64 in [0, 1), sample-major."""
        if not self.index:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([torch.rand(per_sample, generator=g, dtype=torch.float64) for g in self._gens(part)])

    def normal(self, part: int, shape) -> torch.Tensor:
        """(samples, *shape) float64 standard normal draws."""
        if not self.index:
            return torch.zeros(0, *shape, dtype=torch.float64)
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in self._gens(part)])


def _draw_classes(prob: torch.Tensor, gen, part: int, samples: int) -> torch.Tensor:
    """One class per row of ``prob`` (rows, C) (unnormalised weights, float64 on the CPU), rows
    sample-major: (rows, 1) int64. A SampleSeeds draws by inverse CDF with each sample's uniforms."""
    if not isinstance(gen, SampleSeeds):
        return torch.multinomial(prob, 1, generator=gen)
    if len(gen) != samples:
        raise ValueError(f"{len(gen)} sample seeds for {samples} samples")
    cdf = prob.cumsum(1)
    u = gen.uniform(part, prob.shape[0] // max(samples, 1)) * cdf[:, -1]
    y = torch.searchsorted(cdf, u[:, None].contiguous(), right=True)
    return y.clamp_(max=prob.shape[1] - 1)


@dataclass
class CalibData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            feeds = {k: v[start:start + batch_size] for k, v in self.inputs.items()}
            labels = None if self.labels is None else self.labels[start:start + batch_size]
            yield feeds, labels


def load_calib(model: onnx.ModelProto, path: str | None, samples: int, seed: int = 0,
               shapes=None) -> CalibData:
    """Load `--calib FILE.npz` (first `samples` rows); without a file, Gaussian noise inputs (a
    fallback for structure-only checks: curvature from noise is not a substitute for real data)."""
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if path is None:
        feeds = random_inputs(model, batch=samples, seed=seed, shapes=shapes)
        return CalibData(feeds, None, "random (no --calib given)")
    arrays = load_npz(path)
    feeds = match_inputs(model, arrays, path)
    n = len(next(iter(feeds.values())))
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != n:
            raise UserError(f"{path}: 'labels' must be a 1-D integer array with one label per sample")
        labels = labels.astype(np.int64)[:samples]
    if n < samples:
        samples = n
    b = static_batch(model)
    if b is not None and b > 1:  # a static batch runs whole batches only
        if samples < b:
            raise UserError(f"{path}: {samples} samples, fewer than the model's static batch of {b}")
        samples -= samples % b
    return CalibData({k: v[:samples] for k, v in feeds.items()}, None if labels is None else labels[:samples], str(path))


def _resolve_legacy(kind: str, data: CalibData, output_shape) -> str:
    if kind not in LOSSES:
        raise UserError(f"unknown --loss {kind!r} (choose from {', '.join(LOSSES)})")
    classifier = output_shape is not None and len(output_shape) == 2 and (output_shape[1] or 0) != 1
    if kind == "auto":
        if data.labels is not None and classifier:
            return "labels"
        return "true-fisher" if classifier else "gauss-newton"
    if kind in ("labels", "empirical-fisher") and not classifier:
        raise UserError(f"--loss {kind} needs a classifier output (N x classes)")
    if kind == "labels" and data.labels is None:
        raise UserError("--loss labels needs a 'labels' array in the --calib file")
    return kind


@dataclass(frozen=True)
class LossPart:
    """The loss on one graph output: kind (see LOSSES), class axes, what the output holds."""
    index: int
    kind: str
    axes: tuple = ()
    source: str = "logits"  # "logits" | "probs" | "log-probs"
    name: str = ""

    def text(self) -> str:
        if self.kind == "categorical":
            ax = f"axis={self.axes[0]}" if len(self.axes) == 1 else "axes=" + ",".join(map(str, self.axes))
            return f"categorical({ax}, {self.source})"
        if self.kind == "bernoulli":
            return f"bernoulli({self.source})"
        if self.kind in ("labels", "empirical-fisher") and self.source != "logits":
            return f"{self.kind}({self.source})"
        return self.kind


class LossSpec(str):
    """The resolved loss: its text (what the report's "loss" entry says) with one LossPart per output
    that takes part; the losses of several outputs are summed (METHODS §9)."""
    parts: tuple

    def __new__(cls, parts):
        parts = tuple(parts)
        text = parts[0].text() if len(parts) == 1 else " + ".join(f"{p.name}: {p.text()}" for p in parts)
        obj = super().__new__(cls, text)
        obj.parts = parts
        return obj

    def __getnewargs__(self):  # copy / pickle rebuild from the parts, not the text
        return (self.parts,)

    def value(self, outs, labels, gen: torch.Generator, n: int) -> torch.Tensor:
        """Σ over parts of the batch mean (over the ``n`` samples) of each per-sample loss."""
        total = None
        for p in self.parts:
            out = outs[p.index]
            if not out.requires_grad:
                continue
            v = part_loss(p, out, labels, gen, n)
            total = v if total is None else total + v
        if total is None:
            raise UserError("no graph output depends on the layer weights: nothing to take gradients of")
        return total


def as_spec(kind) -> LossSpec:
    """A LossSpec from resolve_loss, or a plain kind name (output 0, as before LossSpec existed)."""
    return kind if isinstance(kind, LossSpec) else LossSpec([LossPart(0, str(kind))])


def _parse(kind: str):
    base, _, arg = str(kind).partition(":")
    if base not in LOSSES or (arg and base != "categorical"):
        raise UserError(f"unknown --loss {kind!r} (choose from {', '.join(LOSSES)}; categorical:AXIS[,AXIS...])")
    axes = None
    if arg:
        try:
            axes = tuple(int(a) for a in arg.split(","))
        except ValueError:
            raise UserError(f"--loss {kind!r}: the class axes must be integers (e.g. categorical:2)") from None
    return base, axes


def _probe(graph, data: CalibData, rows: int = 8):
    """The graph outputs on the first few calibration samples (numpy), or None if they cannot be run."""
    try:
        from converters.onnx_to_torch import TorchGraph

        tg = TorchGraph(graph, trainable=[], share_weights=True)
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v[:rows])) for k, v in data.inputs.items()}
        with torch.no_grad():
            return [o.detach().float().numpy() if o.is_floating_point() else None for o in tg(**feeds)]
    except Exception:
        return None


def resolve_loss(kind: str, data: CalibData, graph, state=None) -> str:
    """The loss whose Fisher / Gauss-Newton the statistics estimate (a LossSpec).

    ``auto``: labels if the calibration file has them and output 0 is a classifier (N x C); else by
    the kind of each output (graphprune/curvature/outputs.py): a Softmax / LogSoftmax (or values
    summing to one along an axis) gives a categorical per position along the class axes, sampled from
    the model's own distribution (the true Fisher); a Sigmoid a Bernoulli per score; unnormalised
    N x C logits at output 0 the classifier's true Fisher; anything else a Gaussian (Gauss-Newton).
    Every floating-point output takes part with ``auto``; an explicit kind applies to output 0.
    (``graph`` may still be output 0's shape, as before: then a plain kind name is returned.)"""
    if state is None and (graph is None or isinstance(graph, (list, tuple))):
        return _resolve_legacy(kind, data, graph)
    from . import outputs as ok

    base, axes = _parse(kind)
    opset = int(getattr(state, "opset", None) or graph.opset or 17)
    def is_float(t) -> bool:
        try:
            return t.dtype is None or np.issubdtype(np.dtype(t.dtype), np.floating)
        except TypeError:  # a dtype numpy does not know (bfloat16, ...): floating point in practice
            return "float" in str(t.dtype).lower()

    outs = [t for t in graph.outputs if is_float(t)]
    if not outs:
        raise UserError("the model has no floating-point output to take a loss of")
    index = {t.name: i for i, t in enumerate(graph.outputs)}
    found = {t.name: ok.detect(graph, state, t, opset) for t in outs}
    probe_for = [t for t in outs if found[t.name] is None and (base == "auto" or t is outs[0])
                 and base not in ("gauss-newton", "bernoulli") and ok.may_be_normalised(graph, t)]
    if probe_for:
        values = _probe(graph, data)
        if values is not None:
            for t in probe_for:
                v = values[index[t.name]]
                if v is not None:
                    found[t.name] = ok.numeric(v)

    def shape(t):
        return state.cost_shape(t) if state is not None else t.shape

    def classifier(t):
        shp = shape(t)
        return shp is not None and len(shp) == 2 and (shp[1] or 0) != 1

    def part(t, kind_):
        f = found[t.name]
        i, name = index[t.name], t.name
        if kind_ in ("labels", "empirical-fisher"):
            src = f.source if f is not None and f.kind == "categorical" and f.axes == (1,) else "logits"
            return LossPart(i, kind_, (1,), src, name)
        if kind_ == "true-fisher":
            if f is not None and f.kind == "categorical":
                return LossPart(i, "categorical", f.axes, f.source, name)
            if f is not None and f.kind == "bernoulli":
                return LossPart(i, "bernoulli", (), f.source, name)
            return LossPart(i, "true-fisher", (), "logits", name)
        if kind_ == "categorical":
            rank = len(shape(t) or []) or None
            ax = axes
            if ax is not None and rank is not None:
                ax = tuple(sorted(a + rank if a < 0 else a for a in ax))
                if any(a <= 0 or a >= rank for a in ax):
                    raise UserError(f"--loss {kind}: class axes must lie in 1..{rank - 1} for output {name!r}")
            if ax is None:
                if f is not None and f.kind == "categorical":
                    ax = f.axes
                elif rank is None or rank < 2:
                    raise UserError(f"--loss categorical needs an output of rank >= 2 ({name!r})")
                else:
                    ax = (rank - 1,) if rank == 3 else (1,)
            src = f.source if f is not None and f.kind == "categorical" and f.axes == ax else "logits"
            return LossPart(i, "categorical", ax, src, name)
        if kind_ == "bernoulli":
            return LossPart(i, "bernoulli", (), "probs" if f is not None and f.kind == "bernoulli" else "logits", name)
        return LossPart(i, kind_, (), "logits", name)  # gauss-newton

    first = outs[0]
    if base == "auto":
        parts = []
        for t in outs:
            f = found[t.name]
            if t is first and data.labels is not None and classifier(t):
                parts.append(part(t, "labels"))
            elif f is not None:
                parts.append(part(t, "true-fisher"))
            elif t is first and classifier(t):
                parts.append(part(t, "true-fisher"))
            else:
                parts.append(part(t, "gauss-newton"))
        return LossSpec(parts)
    if base in ("labels", "empirical-fisher") and not classifier(first):
        raise UserError(f"--loss {base} needs a classifier output (N x classes)")
    if base == "labels" and data.labels is None:
        raise UserError("--loss labels needs a 'labels' array in the --calib file")
    return LossSpec([part(first, base)])


def _categorical_rows(out: torch.Tensor, axes) -> torch.Tensor:
    """(rows, classes): the class axes last and flattened, every other axis (batch too) a row."""
    rest = [d for d in range(out.dim()) if d not in axes]
    x = out.permute(*rest, *axes) if list(rest) + list(axes) != list(range(out.dim())) else out
    return x.reshape(-1, math.prod(out.shape[a] for a in axes))


def part_loss(p: LossPart, out: torch.Tensor, labels, gen, n: int) -> torch.Tensor:
    """One output's loss: the per-sample loss, which sums over the output's positions (a sequence of
    T frames counts T categorical terms per sample), summed over the rows of ``out`` and divided by
    ``n`` (the mini-batch size: under data parallelism ``out`` holds this process's share of the
    mini-batch, and the processes' losses add up to the mini-batch mean). ``gen``: a torch.Generator,
    or SampleSeeds with one entry per row of ``out`` (draws independent of the batching)."""
    if p.kind in ("labels", "true-fisher", "empirical-fisher", "gauss-newton") and p.source == "logits":
        return loss_value(p.kind, out.reshape(out.shape[0], -1) if out.dim() > 2 and p.kind != "gauss-newton"
                          else out, labels, gen, n=n, part=p.index)
    if p.kind in ("labels", "empirical-fisher"):  # from probabilities / log-probabilities
        logp = out if p.source == "log-probs" else torch.log(out.clamp_min(_TINY))
        y = labels if p.kind == "labels" else out.detach().argmax(dim=1)
        return F.nll_loss(logp, y.to(out.device), reduction="sum") / n
    if p.kind == "categorical":
        x = _categorical_rows(out, p.axes)
        if p.source == "logits":
            x = torch.log_softmax(x, dim=1)
        with torch.no_grad():
            prob = x.double().exp() if p.source != "probs" else x.double().clamp_min(0)
            y = _draw_classes(prob.cpu(), gen, p.index, out.shape[0]).to(out.device)
        picked = x.gather(1, y)
        nll = -(torch.log(picked.clamp_min(_TINY)) if p.source == "probs" else picked)
        return nll.sum() / n
    if p.kind == "bernoulli":
        with torch.no_grad():
            prob = torch.sigmoid(out.double()) if p.source == "logits" else out.double().clamp(0, 1)
            if isinstance(gen, SampleSeeds):
                u = gen.uniform(p.index, prob[0].numel() if len(prob) else 0).reshape(prob.shape)
                y = (u < prob.cpu()).to(out.device, out.dtype)
            else:
                y = torch.bernoulli(prob.cpu(), generator=gen).to(out.device, out.dtype)
        if p.source == "logits":
            return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / n
        q = torch.where(y > 0.5, out, 1 - out)  # the probability of the sampled outcome
        return -torch.log(q.clamp_min(_TINY)).sum() / n
    raise ValueError(f"unknown loss part {p.kind!r}")


def loss_value(kind: str, out: torch.Tensor, labels: torch.Tensor | None, gen, n: int | None = None,
               part: int = 0) -> torch.Tensor:
    """The per-sample loss whose Fisher/Gauss-Newton we estimate, summed over the rows of ``out`` and
    divided by ``n`` (default: the rows, i.e. the batch mean). ``gen``: a torch.Generator, or
    SampleSeeds (one stream per sample, see there; ``part`` tells the outputs' streams apart)."""
    n = len(out) if n is None else n
    if kind == "labels":
        return F.cross_entropy(out, labels, reduction="sum") / n
    if kind == "true-fisher":  # y ~ p(y|x): the expected outer product of gradients is the Fisher
        prob = torch.softmax(out.detach().double(), dim=1).cpu()
        y = _draw_classes(prob, gen, part, len(out)).squeeze(1)
        return F.cross_entropy(out, y.to(out.device), reduction="sum") / n
    if kind == "empirical-fisher":
        return F.cross_entropy(out, out.detach().argmax(dim=1), reduction="sum") / n
    # gauss-newton: Gaussian likelihood around the model's own output, target sampled
    if isinstance(gen, SampleSeeds):
        noise = gen.normal(part, out.shape[1:]).to(out.device, out.dtype)
    else:
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    target = out.detach() + noise
    return 0.5 * (out - target).pow(2).sum() / n
