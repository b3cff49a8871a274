"""Recovery: train a pruned model's kept weights to match the dense model (label-free distillation).

The structure never changes: only the values of existing initializers (convolution and linear
weights and biases, normalisation scales and shifts) are trained, and they are written back into the
same initializers, so the result passes the same structural verification as weight compensation (the
original graph carrying the recovered weights, scattered back to their channels, computes what the
written file computes).

Loss per graph output (METHODS §10):
  * ``kl``   classifier logits (N, C): KL(p_dense ‖ p_pruned) at temperature τ, scaled by τ²;
  * ``kl-probs`` / ``kl-logprobs``: the output of a Softmax / LogSoftmax node (also through
    shape-only ops): the same KL per position along the class axis, averaged over the positions;
  * ``kl-bernoulli``: the output of a Sigmoid: the KL of the two Bernoullis per score;
  * ``mse``  anything else: mean squared error divided by the dense output's variance (scale-free);
plus cross-entropy on output 0 when the calibration file has labels and output 0 is a classifier.

Calibration inputs are split once (seeded): a held-out slice gives the early-stopping signal and the
loss curve; the weights kept are those of the best held-out loss seen, the starting point included, so
recovery never hands back a model that does worse on the held-out inputs than it started.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from . import log
from .config import RECOVER_TEMPERATURE
from .errors import UserError
from .runtime import static_batch

#: ops whose parameter inputs recovery trains, and which input positions those are
TRAINED_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "RMSNormalization": (1,), "SimplifiedLayerNormalization": (1,),
}
_SHAPE_ONLY = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}


#: fewest calibration inputs recovery accepts: 1/8 of them (at least one) is the held-out slice
MIN_INPUTS = 8


@dataclass
class RecoverConfig:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    holdout: float = 0.125  # fraction of the calibration inputs held out for early stopping
    temperature: float = RECOVER_TEMPERATURE  # τ of the KL on classifier logits (softened dense targets), loss × τ²
    anchor: float = 0.0  # L2 penalty on the change from the starting (compensated) weights
    feature_weight: float = 1.0  # weight of the intermediate-feature term (when features are given)
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linearly rising learning rate
    eval_every: int = 0  # 0: about 20 evaluations over the run
    mix: float = 0.5  # fraction of each training batch replaced by mixed inputs (needs the dense model)
    seed: int = 0
    device: str = "cpu"
    #: wall-clock budget of this call (s); None: exactly ``steps`` steps. With a budget, a few probe steps
    #: size the warm-up and the warm-up's measured speed the cosine phase (at most ``steps`` in all), so
    #: the schedule runs whole; the report gives the count. The count depends on the machine's speed:
    #: only a cap the budget does not reach (``steps`` run) reproduces a plain ``steps`` run exactly
    seconds: float | None = None


@dataclass
class RecoverResult:
    values: dict[str, np.ndarray]  # initializer name -> trained value (only those that changed)
    history: list[dict] = field(default_factory=list)  # {"step", "train_loss", "holdout_loss"}
    best_step: int = 0
    seconds: float = 0.0
    losses: list[str] = field(default_factory=list)
    samples: dict = field(default_factory=dict)
    processes: int = 1  # data-parallel ranks (torchrun)
    planned: int = 0  # steps the schedule was sized for (``steps``, or what fitted ``seconds``)
    features: list[str] = field(default_factory=list)  # intermediate tensors matched
    labels: bool = False  # cross-entropy on the calibration file's labels as well (else distillation only)
    mixed: float = 0.0  # fraction of each mini-batch that was mixed inputs

    def summary(self) -> dict:
        start = self.history[0]["holdout_loss"] if self.history else None
        best = next((h["holdout_loss"] for h in self.history if h["step"] == self.best_step), None)
        return {"steps": self.history[-1]["step"] if self.history else 0, "planned_steps": self.planned,
                "best_step": self.best_step,
                "holdout_loss_before": start, "holdout_loss_after": best, "losses": self.losses,
                "samples": self.samples, "processes": self.processes, "features": self.features, "labels": self.labels,
                "mixed": self.mixed, "seconds": round(self.seconds, 3),
                "curve": self.history,
                "tensors": sorted(self.values)}


def _producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def output_kinds(model: onnx.ModelProto) -> list[tuple[str, int | None]]:
    """(kind, class axis) per graph output: the output-kind detection the curvature losses use
    (graphprune/curvature/outputs.py: Softmax/LogSoftmax through shape-only ops, Sigmoid), mapped to
    the distillation losses of the module docstring."""
    from .curvature.outputs import detect
    from .tracer import to_graph

    try:  # the detection maps class axes through shape-only ops: it needs the intermediate ranks
        graph = to_graph(onnx.shape_inference.infer_shapes(model))
    except Exception:
        graph = to_graph(model)
    opset = next((x.version for x in model.opset_import if x.domain in ("", "ai.onnx")), 13)
    out = []
    for t, o in zip(graph.outputs, model.graph.output):
        k = detect(graph, None, t, opset)
        dims = o.type.tensor_type.shape.dim
        if k is not None and k.kind == "categorical" and len(k.axes) == 1:
            out.append(("kl-probs" if k.source == "probs" else "kl-logprobs", k.axes[0]))
        elif k is not None and k.kind == "bernoulli":
            out.append(("kl-bernoulli", None))
        elif k is None and len(dims) == 2 and not (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
            out.append(("kl", 1))
        else:  # real-valued, or normalised over several axes at once
            out.append(("mse", None))
    return out


def trainable_names(model: onnx.ModelProto, allowed: set[str] | None = None) -> list[str]:
    """Float initializers feeding the parameter inputs of TRAINED_INPUTS ops (and, if given, in ``allowed``)."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        for k in TRAINED_INPUTS.get(node.op_type, ()):
            if k < len(node.input) and node.input[k] in inits:
                init = inits[node.input[k]]
                if init.data_type == onnx.TensorProto.FLOAT and (allowed is None or init.name in allowed):
                    names.append(init.name)
    return list(dict.fromkeys(names))


def _distill_loss(kinds, outs, teach, labels, T: float, ce_on: bool, scales) -> torch.Tensor:
    """Mean over the batch of the per-sample distillation loss (``scales``: each output's variance
    over the whole calibration set, for the MSE terms)."""
    total = outs[0].new_zeros(())
    for (kind, axis), o, t, scale in zip(kinds, outs, teach, scales):
        if kind == "kl":
            lp, lq = F.log_softmax(o / T, dim=1), F.log_softmax(t / T, dim=1)
            total = total + (lq.exp() * (lq - lp)).sum(1).mean() * T * T
        elif kind in ("kl-probs", "kl-logprobs"):
            if kind == "kl-probs":
                lp, lq = o.clamp_min(1e-12).log(), t.clamp_min(1e-12).log()
            else:
                lp, lq = o, t
            kl = (lq.exp() * (lq - lp)).sum(axis)
            total = total + kl.mean()
        elif kind == "kl-bernoulli":  # a Sigmoid score per position: KL of the two Bernoullis
            q, p = t.clamp(1e-6, 1 - 1e-6), o.clamp(1e-6, 1 - 1e-6)
            total = total + (q * (q.log() - p.log()) + (1 - q) * ((1 - q).log() - (1 - p).log())).mean()
        else:
            total = total + (o - t).pow(2).mean() / scale
    if ce_on and labels is not None:
        kind, axis = kinds[0]
        o = outs[0]
        total = total + (F.nll_loss(o.clamp_min(1e-12).log(), labels) if kind == "kl-probs"
                         else F.nll_loss(o, labels) if kind == "kl-logprobs" else F.cross_entropy(o, labels))
    return total


def _silent(msg: str) -> None:
    pass


def teacher_outputs(dense, inputs: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """The dense model's outputs on the calibration inputs (onnxruntime; ``dense``: a ModelProto or
    GraphModel)."""
    from .runtime import run, session

    sess = session(dense)
    n = len(next(iter(inputs.values())))
    parts: list[list[np.ndarray]] = []
    for s in range(0, n, batch):
        outs = run(sess, {k: v[s:s + batch] for k, v in inputs.items()})
        parts.append([np.asarray(o) for o in outs])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def branch_tensors(model: onnx.ModelProto) -> list[str]:
    """Block boundaries for feature matching: float activations read by two or more nodes (the
    residual stream between blocks, skip connections, concat inputs), graph inputs and outputs aside."""
    inits = {i.name for i in model.graph.initializer}
    skip = inits | {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            if name and name not in skip:
                readers[name] = readers.get(name, 0) + 1
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return [name for name, k in readers.items() if k >= 2 and name in floats]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the activations ``names`` (float32)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                          for n in names if n not in have)
    return m


def teacher_targets(dense, inputs: dict[str, np.ndarray], names: list[str] = (),
                    limit_bytes: int = 1 << 62) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The dense model's outputs and its activations ``names`` (the batch-major ones: a
    sequence-first (T, B, E) tensor is not sliced per sample) on every calibration input, in one
    onnxruntime pass (``dense``: a ModelProto or a GraphModel)."""
    import copy

    from .runtime import GraphModel, run, session

    def extended(keep):
        if isinstance(dense, GraphModel):
            src = copy.copy(dense)
            src.model = with_outputs(dense.model, keep)
            return src, len(dense.model.graph.output)
        return with_outputs(dense, keep), len(dense.graph.output)

    names = list(names)
    if names:
        src, n_out = extended(names)
        sess = session(src)
        one, two = ([np.asarray(a).shape for a in run(sess, {k: v[:1].repeat(b, 0) for k, v in inputs.items()})[n_out:]]
                    for b in (1, 2))
        names = [n for n, a, b in zip(names, one, two) if a and a[0] == 1 and b[0] == 2 and a[1:] == b[1:]]
        del sess
    if not names:
        return teacher_outputs(dense, inputs), {}
    src, n_out = extended(names)
    outs = teacher_outputs(src, inputs)
    total = sum(a.nbytes for a in outs[n_out:])
    if total > limit_bytes:
        raise UserError(f"--recover-features: the dense model's features on the calibration inputs take "
                        f"{total / 2**30:.1f} GiB (limit {limit_bytes / 2**30:.1f} GiB); use fewer inputs or no features")
    return outs[:n_out], dict(zip(names, outs[n_out:]))


def recover(pruned: onnx.ModelProto, inputs: dict[str, np.ndarray], teacher: list[np.ndarray],
            cfg: RecoverConfig, labels: np.ndarray | None = None, allowed: set[str] | None = None,
            tag: str = "", features: dict[str, np.ndarray] | None = None,
            dense: onnx.ModelProto | None = None) -> RecoverResult:
    """Distil ``pruned`` toward ``teacher`` (the dense outputs on ``inputs``). Returns trained values.
    ``features``: dense activations by tensor name; those the pruned model has at the same shape
    (block boundaries the plan left whole) are matched too (MSE over their variance)."""
    from converters.onnx_to_torch import TorchGraph, UnsupportedOpError

    from . import distributed as dp

    if cfg.steps < 0:
        raise UserError(f"--recover must be >= 0 steps, got {cfg.steps}")
    if cfg.seconds is not None and not (cfg.seconds > 0 and math.isfinite(cfg.seconds)):
        raise UserError(f"--recover-time must be a positive number of seconds, got {cfg.seconds}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--recover-lr must be a positive number, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise UserError(f"--recover-batch must be >= 1, got {cfg.batch_size}")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise UserError(f"--recover-temperature must be a positive number, got {cfg.temperature}")
    t0 = time.perf_counter()
    kinds = output_kinds(pruned)
    names = trainable_names(pruned, allowed)
    n = len(next(iter(inputs.values())))
    if not names or cfg.steps == 0:
        return RecoverResult({}, [], 0, time.perf_counter() - t0, [k for k, _ in kinds], {"train": n, "holdout": 0})
    if n < MIN_INPUTS:
        raise UserError(f"recovery needs at least {MIN_INPUTS} calibration inputs (1/8 are held out to choose the "
                        f"step kept), the file has {n}; give more inputs or use --recover 0")
    for (kind, _), t in zip(kinds, teacher):
        if kind == "kl" and t.ndim != 2:
            raise RuntimeError("internal error: classifier output is not 2-D")
    n_out = len(pruned.graph.output)
    feats = _matching_features(pruned, inputs, features or {})
    student = with_outputs(pruned, list(feats)) if feats else pruned
    try:
        tg = TorchGraph(student, trainable=names, device=dp.local_device(cfg.device), share_weights=False)
    except UnsupportedOpError as exc:
        raise UserError(f"{exc}; recovery needs the PyTorch executor (use --recover 0)") from None
    teacher = list(teacher) + list(feats.values())
    f_scales = [max(float(np.var(a, dtype=np.float64)), 1e-12) for a in feats.values()]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)
    fixed = static_batch(pruned)  # a static batch B: the executor runs B samples at a time (forward)
    n_hold = max(1, int(round(n * cfg.holdout)))
    hold, train = order[:n_hold], order[n_hold:]
    dev = torch.device(dp.local_device(cfg.device))
    world, main = dp.world_size(), dp.is_main()
    scales = [max(float(np.var(a, dtype=np.float64)), 1e-12) for a in teacher[:n_out]]

    def forward(graph, x: dict) -> list:
        """graph(**x); B samples at a time, outputs concatenated, for a model with a static batch B
        (the mini-batch's mean loss and its gradient are those of one batched forward)."""
        n = len(next(iter(x.values())))
        if not fixed or n == fixed:
            return graph(**x)
        pad = -n % fixed  # a partial last pass is filled with copies of the last sample, then dropped
        if pad:
            x = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in x.items()}
        outs = [graph(**{k: v[s:s + fixed] for k, v in x.items()}) for s in range(0, n + pad, fixed)]
        return [torch.cat([o[i] for o in outs])[:n] for i in range(len(outs[0]))]

    def tensors(idx):
        x = {k: torch.from_numpy(np.ascontiguousarray(v[idx.numpy()])).to(dev) for k, v in inputs.items()}
        t = [torch.from_numpy(np.ascontiguousarray(a[idx.numpy()])).to(dev, torch.float32) for a in teacher]
        y = None if labels is None else torch.from_numpy(labels[idx.numpy()]).to(dev)
        return x, t, y

    teach_tg = None
    if cfg.mix > 0 and dense is not None:
        teach_tg = TorchGraph(with_outputs(dense, list(feats)) if feats else dense, trainable=[],
                              device=dp.local_device(cfg.device), share_weights=False)
    mix_gen = torch.Generator().manual_seed(cfg.seed + 1)
    can_mix = (teach_tg is not None and labels is None
               and all(np.issubdtype(v.dtype, np.floating) for v in inputs.values()))

    def mix_plan(b: int, g: torch.Generator = mix_gen):
        """For the whole mini-batch (the same draws on every rank): the last k positions become
        convex mixtures of their input and a partner position's, with weights lam."""
        k = int(round(cfg.mix * b)) if can_mix and b >= 2 else 0
        if not k:
            return 0, None, None
        return k, torch.randperm(b, generator=g)[:k], torch.rand(k, generator=g)

    def mix_in(x, t, idx, share, k, partner, lam):
        """Mix this rank's positions ``share`` of the batch ``idx`` per ``mix_plan``; the dense model
        gives the targets of the mixed inputs on the fly (more distinct inputs than the file holds)."""
        b = len(idx)
        m = share >= b - k
        if not bool(m.any()):
            return x, t
        j = share[m] - (b - k)
        xo, _, _ = tensors(idx[partner[j]])
        x = dict(x)
        for name, v in x.items():
            lv = lam[j].view((-1,) + (1,) * (v.ndim - 1)).to(v.device, v.dtype)
            v = v.clone()
            v[m] = lv * v[m] + (1 - lv) * xo[name]
            x[name] = v
        with torch.no_grad():
            extra = forward(teach_tg, {name: v[m] for name, v in x.items()})
        t = list(t)
        for i, e in enumerate(extra):
            t[i] = t[i].clone()
            t[i][m] = e.to(t[i].dtype)
        return x, t

    params = [tg.param(nm) for nm in names]
    start = [p.detach().clone() for p in params]
    ce_on = labels is not None and kinds[0][0] != "mse"
    T = float(cfg.temperature)

    def objective(x, t, y) -> torch.Tensor:
        outs = forward(tg, x)
        loss = _distill_loss(kinds, outs[:n_out], t[:n_out], y, T, ce_on, scales)
        if feats:
            term = sum((o - f).pow(2).mean() / sc for o, f, sc in zip(outs[n_out:], t[n_out:], f_scales))
            loss = loss + cfg.feature_weight * term / len(feats)
        return loss

    def holdout_loss() -> float:
        """Mean held-out loss; under torchrun each rank takes a share and the sums are all-reduced."""
        if not n_hold:
            return float("nan")
        mine = hold[dp.shard_chunks(n_hold, fixed or 1)]  # whole static batches per rank
        tot = torch.zeros((), dtype=torch.float64, device=dev)
        with torch.no_grad():
            for s in range(0, len(mine), 64):
                x, t, y = tensors(mine[s:s + 64])
                tot += float(objective(x, t, y)) * len(mine[s:s + 64])
        dp.all_reduce_sum([tot], cfg.device)  # the backend of the first call serves the whole run
        return float(tot) / n_hold

    def batch_loss(idx, g: torch.Generator = mix_gen) -> torch.Tensor:
        """This rank's part of mini-batch ``idx``'s loss (data parallel: each rank takes a share)."""
        share = torch.arange(len(idx))[dp.shard_chunks(len(idx), fixed or 1)]
        mine = idx[share]
        k, partner, lam = mix_plan(len(idx), g)
        loss = torch.zeros((), device=dev)
        if len(mine):
            x, t, y = tensors(mine)
            if k:
                x, t = mix_in(x, t, idx, share, k, partner, lam)
            # the batch mean, split over the ranks: each share weighted by its size, gradients summed
            loss = objective(x, t, y) * (len(mine) / len(idx))
        if cfg.anchor and main:
            loss = loss + cfg.anchor * sum((p - s).pow(2).sum() for p, s in zip(params, start))
        return loss

    say = log.info if main else _silent
    say(f"{tag}recovery: {len(train)} training + {n_hold} held-out inputs; loss "
        + ", ".join(k for k, _ in kinds) + (" + cross-entropy on the file's labels" if ce_on else
                                            " (no labels in the calibration file: distillation only)")
        + (f"; {cfg.mix:g} of each batch mixed inputs" if can_mix else ""))
    t_eval = time.perf_counter()
    history = [{"step": 0, "train_loss": None, "holdout_loss": holdout_loss()}]
    t_eval = time.perf_counter() - t_eval
    steps = cfg.steps
    if cfg.seconds is not None:
        steps = _fit_steps(cfg, lambda: batch_loss(train[:cfg.batch_size], torch.Generator().manual_seed(cfg.seed + 2)),
                           params, t_eval, t0, dev)
        say(f"{tag}recovery: about {steps} steps fit --recover-time {cfg.seconds:g} s"
            + (f" (capped at {cfg.steps})" if steps == cfg.steps else "")
            + "; the warm-up's measured speed sets the final count")
        if steps == 0:
            log.warn(f"{tag}recovery skipped: --recover-time {cfg.seconds:g} s leaves no time for a training step")
            return RecoverResult({}, history, 0, time.perf_counter() - t0, [k for k, _ in kinds],
                                 {"train": len(train), "holdout": n_hold}, world)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * steps))

    def lr_factor(s: int) -> float:  # linear warm-up (Adam's first steps are the largest), then cosine
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, steps - warm) / max(steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    every = cfg.eval_every or max(1, steps // 20)
    best_loss, best_step = history[0]["holdout_loss"], 0
    best = [p.detach().clone() for p in params]
    perm, pos, running, seen = torch.randperm(len(train), generator=gen), 0, 0.0, 0
    step, t_loop = 0, None
    while step < steps:
        step += 1
        if cfg.seconds is not None and step == 3:
            t_loop = time.perf_counter()  # the first steps build kernels and caches
        if cfg.seconds is not None and step == warm + 1 and warm > 3:
            # the probe sized the warm-up; the steps so far size the rest (the cosine phase starts now)
            steps = _refit_steps(cfg, (time.perf_counter() - t_loop) / (warm - 2), t_eval, t0,
                                 (steps - warm) // every + 1, warm, dev)
            every = cfg.eval_every or max(1, steps // 20)
            say(f"{tag}recovery: {steps} steps in all fit --recover-time {cfg.seconds:g} s at the warm-up's "
                f"{1e3 * (time.perf_counter() - t_loop) / (warm - 2):.1f} ms a step")
        if pos + cfg.batch_size > len(train):
            perm, pos = torch.randperm(len(train), generator=gen), 0
        idx = train[perm[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(idx)
        if loss.requires_grad:
            loss.backward()
        if world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            total = loss.detach().reshape(1).to(torch.float32)
            dp.all_reduce_sum(grads + [total], cfg.device)
            for p, g in zip(params, grads):
                p.grad = g
            loss = total[0]
        if not torch.isfinite(loss):
            log.warn(f"recovery stopped at step {step}: the loss is not finite (try a smaller --recover-lr)")
            break
        opt.step()
        sched.step()
        running += float(loss.detach())
        seen += 1
        if step % every == 0 or step == steps:
            h = holdout_loss()
            history.append({"step": step, "train_loss": running / seen, "holdout_loss": h})
            running, seen = 0.0, 0
            if not n_hold or h < best_loss:
                best_loss, best_step = h, step
                best = [p.detach().clone() for p in params]
            spent = time.perf_counter() - t0
            say(f"{tag}recovery step {step}/{steps}: train loss {history[-1]['train_loss']:.4g}, "
                f"held-out {h:.4g} (best {best_loss:.4g} at step {best_step}); {spent:.0f} s, "
                f"ETA {spent / step * (steps - step):.0f} s")
    values = {}
    if best_step > 0:
        for nm, p in zip(names, best):
            values[nm] = p.detach().cpu().numpy().astype(np.float32)
    res = RecoverResult(values, history, best_step, time.perf_counter() - t0, [k for k, _ in kinds],
                        {"train": len(train), "holdout": n_hold}, world)
    res.planned = steps
    res.features = list(feats)
    res.labels = ce_on
    res.mixed = cfg.mix if can_mix else 0.0
    return res


#: timed probe steps (after two untimed ones) that size a --recover-time schedule
PROBE_STEPS = 8


def _fit_steps(cfg: RecoverConfig, probe_loss, params, t_eval: float, t0: float, dev) -> int:
    """How many training steps fit ``cfg.seconds`` (at most ``cfg.steps``), counted from ``t0``: whole
    steps (forward, backward, an AdamW step) on the first mini-batch are timed on a scratch optimizer,
    then the weights are put back (the training draws are untouched); the ~21 held-out evaluations of a
    run are added, and 10% kept in hand. Under torchrun the ranks average their times, so every rank
    plans the same count."""
    from . import distributed as dp

    saved = [p.detach().clone() for p in params]
    scratch = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    times = []
    for i in range(PROBE_STEPS + 2):
        t = time.perf_counter()
        scratch.zero_grad(set_to_none=True)
        loss = probe_loss()
        if loss.requires_grad:
            loss.backward()
        scratch.step()
        float(loss.detach())
        if i >= 2:  # the first passes build kernels and caches
            times.append(time.perf_counter() - t)
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
            p.grad = None
    per_step = sorted(times)[len(times) // 2]
    est = torch.tensor([per_step, t_eval, time.perf_counter() - t0], dtype=torch.float64, device=dev)
    dp.all_reduce_sum([est], cfg.device)
    per_step, t_eval, spent = (est / dp.world_size()).tolist()
    left = 0.9 * cfg.seconds - spent - 20 * t_eval
    return int(max(0, min(cfg.steps, left // max(per_step, 1e-9))))


def _refit_steps(cfg: RecoverConfig, per_step: float, t_eval: float, t0: float, evals: int, done: int, dev) -> int:
    """Total steps once the warm-up has run: the cosine phase gets what is left of ``cfg.seconds``
    (10% kept in hand) at the warm-up's measured step time; ranks agree as in :func:`_fit_steps`."""
    from . import distributed as dp

    est = torch.tensor([per_step, time.perf_counter() - t0], dtype=torch.float64, device=dev)
    dp.all_reduce_sum([est], cfg.device)
    per_step, spent = (est / dp.world_size()).tolist()
    left = 0.9 * cfg.seconds - spent - evals * t_eval
    return int(min(cfg.steps, done + max(1, left // max(per_step, 1e-9))))


def _matching_features(pruned: onnx.ModelProto, inputs, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dense features the pruned model has under the same name at the same per-sample shape."""
    if not features:
        return {}
    from .runtime import run, session

    produced = {o for n in pruned.graph.node for o in n.output}
    names = [n for n in features if n in produced]
    if not names:
        return {}
    probe = run(session(with_outputs(pruned, names)), {k: v[:1] for k, v in inputs.items()})
    shapes = dict(zip(names, (np.asarray(a).shape[1:] for a in probe[len(pruned.graph.output):])))
    return {n: features[n] for n in names if shapes[n] == features[n].shape[1:]}


def write_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Replace initializer values in place (same names, shapes and types: the structure is unchanged)."""
    for init in model.graph.initializer:
        if init.name in values:
            old = numpy_helper.to_array(init)
            new = values[init.name]
            if new.shape != old.shape:
                raise RuntimeError(f"internal error: recovered {init.name!r} changed shape")
            init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
    return model
