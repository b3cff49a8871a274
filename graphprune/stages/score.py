"""Stage: score. What the criterion needs, the calibration statistics (streamed through the PyTorch
executor), and one score per prunable unit."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import onnx

from .. import log
from ..config import PruneConfig
from ..criteria import ScoringContext, make_criterion
from ..errors import UserError
from ..memory import trim
from ..planner import Budget
from ..tracer import Trace


def needs_of(criterion, compensate: str | None) -> set[str]:
    """The statistics a criterion and its compensation read (``weights`` are always there)."""
    needs = set(criterion.needs) - {"weights"}
    if compensate in ("woodfisher", "woodtaylor"):
        needs.add(compensate)  # their own block inverses (woodtaylor: with the mean gradient)
    elif compensate == "kron-obs":
        needs.add("kfac")  # the producer-row update reads S
    elif compensate:
        needs.add("kfac_a")  # layer-wise OBS reads the input factors only
    return needs


def compensation_method(criterion, config: PruneConfig) -> str | None:
    """None, or "obs" / "kron-obs" / "woodfisher" / "woodtaylor": curvature criteria compensate by default."""
    if isinstance(config.compensate, str):
        from ..curvature.compensate import METHODS

        if config.compensate not in METHODS:
            raise UserError(f"unknown compensation {config.compensate!r} (choose from {', '.join(METHODS)})")
        return config.compensate
    on = config.compensate if config.compensate is not None else criterion.curvature
    if not on:
        return None
    return {"kron-obs": "kron-obs", "woodfisher": "woodfisher", "woodtaylor": "woodtaylor"}.get(criterion.name, "obs")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def collect_statistics(model: onnx.ModelProto, tr: Trace, ctx: ScoringContext, config: PruneConfig,
                       needs: set[str], timings: dict, tag: str = "", on_batch=None, scored_only: bool = False) -> dict:
    """Calibration data → PyTorch executor → streamed statistics, stored on ``ctx``. Returns the
    report's entries about them (loss, calibration source, samples, block size). ``scored_only``:
    statistics only for the layers a channel criterion reads and compensation updates (those with
    output rows or input columns in a prunable group); the others (a classifier head whose classes
    are a graph output, depthwise convs, layers between frozen groups) get none."""
    from converters.onnx_to_torch import ExecutionError, TorchGraph, UnsupportedOpError

    from ..curvature.collect import available_bytes, collect, default_block_size, estimate_bytes
    from ..curvature.data import load_calib, resolve_loss
    from ..curvature.layers import layer_views
    from ..runtime import static_batch

    t = time.perf_counter()
    data = load_calib(model, config.calib, config.samples, config.seed, shapes=tr.input_shapes)
    loss_kind = resolve_loss(config.loss, data, tr.graph, tr.state)  # a LossSpec: str, per-output parts
    ctx.views = views = layer_views(tr.graph, tr.state)
    if scored_only:
        used = {v.node for g in tr.groups if g.prunable for v, _, _ in ctx.layer_units(g)}
        views = {n: v for n, v in ctx.views.items() if n in used}
    shared = str(config.device).split(":")[0] == "cpu"
    limit = config.max_memory or int(0.8 * (available_bytes() or 1 << 60))
    block = None
    if needs & {"woodfisher", "woodtaylor"}:
        block = config.block_size or default_block_size(views, needs, limit, weights_shared=shared)
    need = estimate_bytes(views, needs, weights_shared=shared, block_size=block)
    if sum(need.values()) > limit:
        worst = max((k for k in need if k != "transient"), key=need.get)
        label = {"executor": "PyTorch weights + gradients"}.get(worst, worst)
        raise UserError(f"curvature statistics need about {_gib(sum(need.values()))} ({label}: "
                        f"{_gib(need[worst])}) but the limit is {_gib(limit)}; use a "
                        "lighter criterion (taylor, fisher, kron-obd/kron-obs instead of woodfisher), "
                        "--no-compensate, " + ("a smaller --block-size, " if config.block_size else "")
                        + "or raise --max-memory")
    from ..distributed import local_device

    device = local_device(config.device)  # under torchrun / --workers: cuda means this rank's GPU
    try:
        tg = TorchGraph(tr.graph, trainable=[n for v in views.values() for n in (v.weight, v.bias) if n],
                        device=device, share_weights=True)  # on CPU: no second copy of the weights
    except UnsupportedOpError as exc:
        raise UserError(f"{exc}; use a weights-only criterion (magnitude) for this model") from None
    try:
        ctx.stats = collect(tg, views, data, loss_kind, needs, batch_size=config.batch_size,
                            damping=config.damping, seed=config.seed, device=device, on_batch=on_batch,
                            block_size=block, micro=static_batch(model))
    except ExecutionError as exc:
        raise UserError(f"calibration statistics: {exc}; a weights-only criterion (magnitude) needs no "
                        "executor") from None
    timings[tag + "statistics"] = time.perf_counter() - t
    meta = {"loss": loss_kind, "calibration": data.source, "samples": len(data)}
    if block is not None:
        meta["block_size"] = block
    return meta


@dataclass
class Scoring:
    """What the score stage hands on: the criterion, its compensation method, the context holding
    the statistics (compensation reads them), the scores, and the report's entries about the data."""
    criterion: object
    method: str | None
    ctx: ScoringContext
    scores: dict
    meta: dict = field(default_factory=dict)


def score(model: onnx.ModelProto, tr: Trace, config: PruneConfig, budget: Budget, timings: dict,
          tag: str = "") -> Scoring:
    """Statistics (when the criterion needs any) → scores."""
    criterion = make_criterion("lossless" if budget.kind == "lossless" else config.criterion)
    method = compensation_method(criterion, config)
    ctx = ScoringContext(tr)
    needs = needs_of(criterion, method)
    meta = collect_statistics(model, tr, ctx, config, needs, timings, tag, scored_only=True,
                              on_batch=lambda g: criterion.on_batch(ctx, g)) if needs else {}
    block = meta.get("block_size")
    if method in ("woodfisher", "woodtaylor") and block and ctx.views:
        longest = max(v.cols + 1 for v in ctx.views.values())
        if block < longest // 4:  # a block holds under a quarter of the longest row
            log.info(f"{method}: blocks of {block} weights for rows of up to {longest}: a removed input "
                     "channel is compensated only within its block (on a trained ResNet-18 that kept "
                     "87.9% where --compensate obs kept 99.0%; README, WoodFisher at scale)")
    t = time.perf_counter()
    scores = criterion.score(ctx)
    timings[tag + "score"] = time.perf_counter() - t
    trim()  # the executor, its gradients and activations are gone
    return Scoring(criterion, method, ctx, scores, meta)
