"""The Python API: inspect, prune, verify. The CLI is a thin layer over these functions."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from . import __version__, log
from .cost import model_costs
from .criteria import ScoringContext, make_criterion
from .errors import UserError, VerificationError
from .io import (FILE_ROUTE_BYTES, check_output, infer_shapes, load_model, opset_of, save_model, weight_bytes,
                 write_json_atomic)
from .planner import Budget, make_plan
from .rewriter import apply_plan, expanded_pruned, export_graph, masked_view, sliced_mismatches
from .memory import prefer_mmap, trim
from .runtime import GraphModel
from .runtime import run, session
from .tracer import Trace, detach_weights, to_graph, trace
from .parity import compare
from .shapes import describe as describe_shapes, resolve as resolve_shapes, second_size, text as _sizes_text


def _upgrade_info(model: onnx.ModelProto) -> dict:
    """{"opset_upgraded": {...}} when load_model upgraded a legacy opset (recorded in the metadata)."""
    from .io import upgraded_from

    old = upgraded_from(model)
    return {"opset_upgraded": {"from": old, "to": opset_of(model)}} if old is not None else {}


#: what ``--criterion auto`` (the default) means with calibration data (without it: magnitude, since
#: curvature from noise inputs means nothing); chosen from the held-out table in the README
AUTO_CRITERION = "taylor"


@dataclass
class PruneConfig:
    criterion: str = "auto"  # AUTO_CRITERION with --calib, else magnitude
    budget: Budget = field(default_factory=lambda: Budget("flops", 0.5))
    verify: bool = True
    rtol: float = 1e-4
    seed: int = 0
    force: bool = False
    eval_data: str | None = None
    external_data: bool = False  # write OUT.data beside OUT (automatic for models over 2 GB)
    # curvature criteria and compensation
    calib: str | None = None  # .npz, one array per input (+ optional labels)
    samples: int = 128
    batch_size: int = 32
    loss: str = "auto"
    compensate: bool | str | None = None  # None: on for curvature criteria; or a method name
    damping: float = 1e-3
    device: str = "cpu"
    steps: int = 1
    # recovery by distillation from the dense model (graphprune/recover.py): steps per round; None:
    # AUTO_RECOVER_STEPS when --calib is given (and the criterion is not eigendamage), else off
    recover: int | None = None
    recover_lr: float = 1e-3
    recover_batch: int = 32
    recover_features: bool = False  # also match block-boundary activations the plan left whole
    max_memory: int | None = None  # bytes for curvature statistics (default: 80% of available RAM)
    block_size: int | None = None  # WoodFisher diagonal blocks (weights); None: the largest that fits max_memory
    # hardware-aware planning (--keep-latency)
    provider: str = "cpu"
    latency_batch: int = 8
    latency_cache: str | None = None
    latency_attempts: int = 5
    #: the input size to count and check at: ``--input-shape`` strings or {input: dims}; None: the
    #: calibration arrays' shapes, else the model's static dims (see graphprune.shapes.resolve)
    input_shapes: object = None


def load_and_trace(path: str | os.PathLike, input_shapes=None, calib: str | None = None,
                   hint=None) -> tuple[onnx.ModelProto, Trace]:
    """Load, validate and trace a model at its input size (``input_shapes``: ``--input-shape``
    strings or {input: dims}; else the shapes of the ``calib`` arrays; else the model's static dims;
    see graphprune.shapes.resolve). Returns (skeleton, trace): the trace's graph holds the only
    copy of the weights (external data is read from its files straight into the graph's arrays); the
    ModelProto is weight-free and carries the signature, opset and metadata. Run the original with
    ``GraphModel(trace.graph, skeleton)``; export a copy with ``export_graph``."""
    model = load_model(path, allow_quantized=False, load_external=False)
    shapes = resolve_shapes(model, input_shapes, calib, hint)
    if weight_bytes(model) >= FILE_ROUTE_BYTES:
        prefer_mmap()
    graph = to_graph(model, base=Path(path).parent)
    skeleton = detach_weights(model, graph)
    del model  # the loaded proto, and with it the proto's copy of the weights
    trim()
    return skeleton, trace(graph, opset_of(skeleton), shapes)


def check_sizes(model: onnx.ModelProto, tr: Trace) -> dict:
    """Keyword arguments for parity.compare: the trace's input size and, for models with dynamic
    non-batch dims, a second valid size (stepped by the model's stride)."""
    return {"shapes": tr.input_shapes, "second": second_size(model, tr.input_shapes, tr.state.static_shapes)}


def signature(model: onnx.ModelProto) -> dict:
    def sig(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            out.append((v.name, tt.elem_type, dims))
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": sig(v for v in model.graph.input if v.name not in inits), "outputs": sig(model.graph.output)}


def _keep_signature(pruned: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the pruned model the original's declared outputs (symbolic dims included): channels that
    reach an output are frozen, so the outputs are the same tensors; shape inference on the rewritten
    graph may only have resolved a symbolic dim the original declares (e.g. at a static input)."""
    if [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]:
        for dst, src in zip(pruned.graph.output, model.graph.output):
            if dst.type.tensor_type.elem_type == src.type.tensor_type.elem_type:
                dst.CopyFrom(src)
    return pruned


def describe_groups(tr: Trace, removed: dict[int, np.ndarray] | None = None) -> list[dict]:
    out = []
    removed = removed or {}
    n_members = np.zeros(len(tr.groups), dtype=np.int64)
    for m in tr.members:
        gids = np.unique(tr.locate(m.ids)[0])
        n_members[gids[gids >= 0]] += 1
    for g in tr.groups:
        rem = removed.get(g.id, np.zeros(0, dtype=np.int64))
        keep = tr.kept_fn(set(g.units[rem].tolist()))
        entry = {
            "id": g.id,
            "size": g.size,
            "kept": g.size - len(rem),
            "channels_per_unit": g.channels_per_unit,
            "prunable": g.prunable,
            "frozen": g.frozen,
            "sources": [{"node": s.node, "tensor": s.tensor, "channels": len(s.ids)} for s in g.sources],
            "members": int(n_members[g.id]),
            "removed": rem.tolist(),
        }
        if len(rem):
            entry["removed_channels"] = {s.node: np.nonzero(~keep(s.ids))[0].tolist() for s in g.sources}
        out.append(entry)
    return out


def inspect(path: str | os.PathLike, input_shapes=None, calib: str | None = None) -> dict:
    t0 = time.perf_counter()
    model, tr = load_and_trace(path, input_shapes, calib)
    elapsed = time.perf_counter() - t0
    costs = model_costs(tr)
    groups = describe_groups(tr)
    return {
        "model": str(path),
        "opset": opset_of(model),
        **_upgrade_info(model),
        "input_shapes": describe_shapes(tr.input_shapes),
        "nodes": len(model.graph.node),
        "macs": costs["macs"],
        "params": costs["params"],
        "groups": groups,
        "prunable_groups": sum(g["prunable"] for g in groups),
        "prunable_channels": sum(g["size"] for g in groups if g["prunable"]),
        "trace_seconds": round(elapsed, 4),
    }


def evaluate(model: onnx.ModelProto | GraphModel, data_path: str | os.PathLike) -> float:
    """Top-1 accuracy of output 0 on an .npz with one array per input (or one unnamed) and `labels`."""
    from .calib import load_labelled

    feeds, labels = load_labelled(model, data_path)
    sess = session(model)
    correct, n = 0, len(labels)
    names = list(feeds)
    for start in range(0, n, 256):
        batch = {k: feeds[k][start:start + 256] for k in names}
        logits = run(sess, batch)[0]
        correct += int(np.sum(np.argmax(logits.reshape(len(logits), -1), axis=1) == labels[start:start + 256]))
    return correct / max(n, 1)


def _needs(criterion, compensate: str | None) -> set[str]:
    needs = set(criterion.needs) - {"weights"}
    if compensate in ("woodfisher", "woodtaylor"):
        needs.add(compensate)  # their own block inverses (woodtaylor: with the mean gradient)
    elif compensate == "kron-obs":
        needs.add("kfac")  # the producer-row update reads S
    elif compensate:
        needs.add("kfac_a")  # layer-wise OBS reads the input factors only
    return needs


def _compensation_method(criterion, config: "PruneConfig") -> str | None:
    """None, or "obs" / "kron-obs" / "woodfisher": curvature criteria compensate by default."""
    if isinstance(config.compensate, str):
        from .curvature.compensate import METHODS

        if config.compensate not in METHODS:
            raise UserError(f"unknown compensation {config.compensate!r} (choose from {', '.join(METHODS)})")
        return config.compensate
    on = config.compensate if config.compensate is not None else criterion.curvature
    if not on:
        return None
    return {"kron-obs": "kron-obs", "woodfisher": "woodfisher", "woodtaylor": "woodtaylor"}.get(criterion.name, "obs")


def collect_statistics(model: onnx.ModelProto, tr: Trace, ctx: ScoringContext, config: "PruneConfig",
                       needs: set[str], timings: dict, tag: str = "", on_batch=None) -> dict:
    """Calibration data → PyTorch executor → streamed statistics, stored on ``ctx``."""
    from converters.onnx_to_torch import TorchGraph, UnsupportedOpError

    from .curvature.collect import collect
    from .curvature.data import load_calib, resolve_loss
    from .curvature.layers import layer_views

    from .curvature.collect import available_bytes, default_block_size, estimate_bytes

    t = time.perf_counter()
    data = load_calib(model, config.calib, config.samples, config.seed, shapes=tr.input_shapes)
    loss_kind = resolve_loss(config.loss, data, tr.graph, tr.state)  # a LossSpec: str, per-output parts
    ctx.views = layer_views(tr.graph, tr.state)
    shared = str(config.device).split(":")[0] == "cpu"
    limit = config.max_memory or int(0.8 * (available_bytes() or 1 << 60))
    block = None
    if needs & {"woodfisher", "woodtaylor"}:
        block = config.block_size or default_block_size(ctx.views, needs, limit, weights_shared=shared)
    need = estimate_bytes(ctx.views, needs, weights_shared=shared, block_size=block)
    if sum(need.values()) > limit:
        worst = max((k for k in need if k != "transient"), key=need.get)
        def gib(n: float) -> str:
            return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

        label = {"executor": "PyTorch weights + gradients"}.get(worst, worst)
        raise UserError(f"curvature statistics need about {gib(sum(need.values()))} ({label}: "
                        f"{gib(need[worst])}) but the limit is {gib(limit)}; use a "
                        "lighter criterion (taylor, fisher, kron-obd/kron-obs instead of woodfisher), "
                        "--no-compensate, " + ("a smaller --block-size, " if config.block_size else "")
                        + "or raise --max-memory")
    try:
        tg = TorchGraph(tr.graph, trainable=[n for v in ctx.views.values() for n in (v.weight, v.bias) if n],
                        device=config.device, share_weights=True)  # on CPU: no second copy of the weights
    except UnsupportedOpError as exc:
        raise UserError(f"{exc}; use a weights-only criterion (magnitude) for this model") from None
    ctx.stats = collect(tg, ctx.views, data, loss_kind, needs, batch_size=config.batch_size,
                        damping=config.damping, seed=config.seed, device=config.device, on_batch=on_batch,
                        block_size=block)
    timings[tag + "statistics"] = time.perf_counter() - t
    meta = {"loss": loss_kind, "calibration": data.source, "samples": len(data)}
    if block is not None:
        meta["block_size"] = block
    return meta


def _score(model: onnx.ModelProto, tr: Trace, config: PruneConfig, budget: Budget, timings: dict, tag: str):
    criterion = make_criterion("lossless" if budget.kind == "lossless" else config.criterion)
    method = _compensation_method(criterion, config)
    ctx = ScoringContext(tr)
    needs = _needs(criterion, method)
    meta = collect_statistics(model, tr, ctx, config, needs, timings, tag,
                              on_batch=lambda g: criterion.on_batch(ctx, g)) if needs else {}
    t = time.perf_counter()
    scores = criterion.score(ctx)
    timings[tag + "score"] = time.perf_counter() - t
    trim()  # the executor, its gradients and activations are gone
    return criterion, method, ctx, scores, meta


def _apply(model, tr: Trace, ctx, scores, criterion, method, meta: dict, config: PruneConfig, budget: Budget,
           timings: dict, tag: str, latency_table=None) -> dict:
    """plan → (compensate) → rewrite → check → verify. Compensation writes into ``tr.graph``; the
    original values are returned under "originals" so a caller can restore them."""
    t = time.perf_counter()
    plan = make_plan(tr, scores, budget, latency_table)
    timings[tag + "plan"] = time.perf_counter() - t
    removed_roots = tr.removed_roots(plan.removed)
    originals, compensated = {}, []
    if method and removed_roots:
        from .curvature.compensate import compensate

        t = time.perf_counter()
        tensors = tr.graph.tensors()
        for name, values in compensate(ctx, tr.kept_fn(removed_roots), method, config.damping).items():
            originals[name] = tensors[name].values
            tensors[name].values = values
            compensated.append(name)
        timings[tag + "compensate"] = time.perf_counter() - t
    t = time.perf_counter()
    pruned = _keep_signature(infer_shapes(apply_plan(tr, removed_roots, model)), model)
    trim()  # the rewrite's sliced copies are in ``pruned`` now
    try:
        check_output(pruned)
    except Exception as exc:  # a bug, never the user's fault: keep the traceback
        raise RuntimeError(f"internal error: pruned model fails onnx.checker: {exc}") from exc
    if signature(pruned) != signature(model):
        raise RuntimeError("internal error: pruned model changed the input/output signature")
    timings[tag + "rewrite"] = time.perf_counter() - t
    result = None
    if config.verify:
        t = time.perf_counter()
        result = compare(lambda: masked_view(tr, removed_roots, model), pruned, seed=config.seed, rtol=config.rtol,
                         **check_sizes(model, tr))
        trim()
        timings[tag + "verify"] = time.perf_counter() - t
        if not result["ok"]:
            raise VerificationError(f"pruned model differs from the masked original "
                                    f"(max rel error {result.get('max_rel_error', float('nan')):.3g}); nothing written")
    return {"criterion": criterion.name, "compensation": method, "plan": plan, "pruned": pruned,
            "removed_roots": removed_roots, "verification": result, "originals": originals,
            "compensated_tensors": compensated, **meta}


def _latency_round(model, tr: Trace, ctx, scores, criterion, method, meta, config: PruneConfig, budget: Budget,
                   timings: dict, tag: str) -> dict:
    """--keep-latency: plan against the per-layer latency table, measure the pruned model end to
    end, and correct the layer budget until the measured latency lands on the target."""
    from .latency import LatencyTable

    t = time.perf_counter()
    table = LatencyTable(config.provider, config.latency_batch, config.latency_cache, shapes=tr.input_shapes)
    dense_model = export_graph(tr.graph.copy(), model)  # the original as deployed (before any compensation)
    ratio, attempts, best = budget.ratio, [], None
    for attempt in range(config.latency_attempts):
        res = _apply(model, tr, ctx, scores, criterion, method, meta, config,
                     Budget("latency", ratio, budget.cap, budget.round_to, best_effort=True), timings, tag, table)
        dense, measured = table.measure_pair(dense_model, res["pruned"])
        target = budget.ratio * dense
        plan = res["plan"]
        attempts.append({"layer_budget": round(ratio, 4), "layers_ms_before": plan.before["latency"],
                         "layers_ms_predicted": plan.after["latency"],
                         "predicted_ms": dense * plan.after["latency"] / max(plan.before["latency"], 1e-9),
                         "measured_ms": measured})
        log.info(f"latency attempt {attempt + 1}: layer budget {ratio:.3f}, measured {measured:.3f} ms "
                 f"(target {target:.3f} ms)")
        error = abs(measured / target - 1)
        within = 0.9 * target <= measured <= target
        if best is None or (within and not best[2]) or (within == best[2] and error < best[0]):
            best = (error, {**res, "_measured": measured, "_dense": dense, "_target": target}, within)
        tensors = tr.graph.tensors()
        for name, values in res["originals"].items():  # undo compensation before another attempt
            tensors[name].values = values
        if within:
            break
        ratio = float(min(1.0, max(0.01, ratio * target / measured)))
    timings[tag + "latency_planning"] = time.perf_counter() - t
    timings[tag + "latency_tables_measured_s"] = table.seconds
    table.save()
    res = best[1]
    dense, target = res["_dense"], res["_target"]
    met = res["_measured"] <= target * 1.1
    res["latency"] = {"provider": config.provider, "device": table.device, "batch": config.latency_batch,
                      "dense_ms": dense, "target_ms": target, "measured_ms": res["_measured"],
                      "predicted_ms": next(a["predicted_ms"] for a in attempts if a["measured_ms"] == res["_measured"]),
                      "attempts": attempts, "cache": str(table.cache_path), "layers_measured": table.measured}
    res["plan"].budget_met = met
    res["plan"].notes = []  # the layer-sum budget is internal; only the measured target counts
    if not met:
        msg = (f"--keep-latency {budget.ratio:g}: best measured {res['_measured']:.3f} ms for a target of "
               f"{target:.3f} ms ({res['_measured'] / dense:.2f} of dense)")
        if not budget.best_effort:
            raise UserError(msg + "; use --best-effort to accept it")
        res["plan"].notes.append(msg)
    return res


def _prune_round(model: onnx.ModelProto, tr: Trace, config: PruneConfig, budget: Budget, timings: dict,
                 tag: str = "") -> dict:
    """One trace→score→plan→(compensate)→rewrite→check→verify round on an in-memory model."""
    criterion, method, ctx, scores, meta = _score(model, tr, config, budget, timings, tag)
    if budget.kind == "latency":
        res = _latency_round(model, tr, ctx, scores, criterion, method, meta, config, budget, timings, tag)
    else:
        res = _apply(model, tr, ctx, scores, criterion, method, meta, config, budget, timings, tag)
    for note in res["plan"].notes:
        log.warn(note)
    return res


def _round_budgets(budget: Budget, steps: int, before: dict, current: dict, k: int) -> Budget:
    """Budget for round k (1-based) of `steps`, relative to the current model."""
    if steps == 1 or budget.kind == "lossless":
        return budget
    cap = 1 - (1 - budget.cap) ** (1 / steps)
    if budget.kind == "channels":
        ratio = budget.ratio ** (1 / steps)
    else:
        kind = "macs" if budget.kind == "flops" else "params"
        target = 1 - (1 - budget.ratio) * k / steps
        ratio = min(1.0, target * before[kind] / max(current[kind], 1.0))
    return Budget(budget.kind, ratio, cap, budget.round_to, budget.best_effort)


#: recovery steps per round when --recover is not given and calibration data is
AUTO_RECOVER_STEPS = 100


def recovery_steps(config: "PruneConfig") -> int:
    """Recovery steps per round that ``config`` asks for (``recover=None``: automatic)."""
    if config.recover is None:
        auto = (config.calib is not None and config.budget.kind != "lossless"
                and config.criterion != "eigendamage")
        return AUTO_RECOVER_STEPS if auto else 0
    if config.recover < 0:
        raise UserError(f"--recover must be >= 0 steps, got {config.recover}")
    if config.recover and config.calib is None:
        raise UserError("--recover distils from the dense model on the calibration inputs: give --calib FILE.npz")
    if config.recover and config.criterion == "eigendamage":
        raise UserError("--recover does not apply to --criterion eigendamage (its bottlenecks are verified as "
                        "products of the original's weights); use --recover 0")
    return config.recover


class _Recovery:
    """What recovery needs across rounds: the calibration inputs (every row of the file), the dense
    model's outputs on them (computed once, before scoring or compensation touch the weights), and the
    names of the original's initializers (only those may be trained: verification scatters them back)."""

    def __init__(self, model, tr: Trace, config: "PruneConfig", steps: int, timings: dict):
        from .curvature.collect import available_bytes
        from .curvature.data import load_calib
        from .recover import RecoverConfig, branch_tensors, teacher_targets

        t = time.perf_counter()
        data = load_calib(model, config.calib, 1 << 62, config.seed, shapes=tr.input_shapes)
        self.inputs, self.labels = data.inputs, data.labels
        dense = GraphModel(tr.graph, model)
        names = branch_tensors(dense.model) if config.recover_features else []
        self.teacher, self.features = teacher_targets(dense, self.inputs, names,
                                                      int(0.25 * (available_bytes() or 1 << 34)))
        self.allowed = {name for name, t in tr.graph.tensors().items() if hasattr(t, "values")}
        self.cfg = RecoverConfig(steps=steps, lr=config.recover_lr, batch_size=config.recover_batch,
                                 seed=config.seed, device=config.device)
        self.rounds: list[dict] = []
        timings["recovery_teacher"] = time.perf_counter() - t

    def run(self, pruned: onnx.ModelProto, timings: dict, tag: str, eval_data: str | None) -> list[str]:
        """Train ``pruned``'s weights in place; returns the names of the tensors written."""
        from .recover import recover, write_values

        t = time.perf_counter()
        before = evaluate(pruned, eval_data) if eval_data else None
        res = recover(pruned, self.inputs, self.teacher, self.cfg, self.labels, self.allowed,
                      tag=tag.replace("_", " "), features=self.features)
        write_values(pruned, res.values)
        entry = res.summary()
        if before is not None:
            entry["accuracy_before_recovery"] = before
        self.rounds.append(entry)
        timings[tag + "recovery"] = time.perf_counter() - t
        return sorted(res.values)


def _key(group) -> str:
    return group.sources[0].node


def _accuracy_before(model, tr: Trace, config: "PruneConfig", timings: dict) -> float | None:
    """Accuracy of the original on --eval data, measured before scoring or compensation touch the
    trace graph (which holds the original's only copy of the weights)."""
    if not config.eval_data:
        return None
    t = time.perf_counter()
    accuracy = evaluate(GraphModel(tr.graph, model), config.eval_data)
    timings["evaluate"] = time.perf_counter() - t
    return accuracy


def _finish(report: dict, before: float | None, pruned, path, out, config: "PruneConfig", report_path,
            timings) -> dict:
    if config.eval_data:
        t = time.perf_counter()
        report["accuracy"] = {"before": before, "after": evaluate(pruned, config.eval_data)}
        rounds = (report.get("recovery") or {}).get("rounds") or []
        if rounds and "accuracy_before_recovery" in rounds[-1]:
            report["accuracy"]["before_recovery"] = rounds[-1]["accuracy_before_recovery"]
        timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    from .distributed import is_main

    if not is_main():  # under torchrun every rank computes the same model; rank 0 writes it
        return report
    save_model(pruned, out, src=path, force=config.force, external_data=config.external_data or None)
    if report_path is not None:
        try:
            write_json_atomic(report, report_path)
        except BaseException:
            Path(out).unlink(missing_ok=True)
            raise
    return report


def _eigendamage(path, out, config: "PruneConfig", report_path, model, tr, timings, before_accuracy) -> dict:
    """Layer rewriting in the Kronecker-factored eigenbasis (see graphprune/eigendamage.py)."""
    from . import eigendamage as ed

    ed.check_supported(config.budget)
    if config.steps != 1:
        raise UserError("--criterion eigendamage is one-shot (no --steps)")
    ctx = ScoringContext(tr)
    meta = collect_statistics(model, tr, ctx, config, {"kfac"}, timings)
    nodes = {n.name: n for n in tr.graph.nodes}
    views = {n: v for n, v in ctx.views.items() if v.groups == 1 and ctx.stats.layers[n].n > 0
             and float(nodes[n].attrs.get("alpha", 1.0)) == 1.0 and float(nodes[n].attrs.get("beta", 1.0)) == 1.0
             and len(tr.graph.tensors()[v.weight].outputs) == 1}
    ctx.views = views
    t = time.perf_counter()
    kfes = {n: ed.decompose(ctx, v, config.damping) for n, v in views.items()}
    before = model_costs(tr)
    fixed = before["macs"] - sum(ed.layer_macs(v, kfes[n], v.out, v.cols // v.taps)[0] for n, v in views.items())
    ranks, _ = ed.plan_ranks(ctx, kfes, config.budget.ratio * before["macs"], fixed)
    timings["score_and_plan"] = time.perf_counter() - t
    t = time.perf_counter()
    ref_graph = tr.graph.copy()
    ref_tensors = ref_graph.tensors()
    for name, values in ed.projected_weights(ctx, kfes, ranks).items():
        ref_tensors[name].values = values
    reference = GraphModel(ref_graph, model)
    new_graph = tr.graph.copy()
    layers = ed.rewrite(new_graph, ctx, kfes, ranks)
    pruned = _keep_signature(infer_shapes(export_graph(new_graph, model)), model)
    check_output(pruned)
    if signature(pruned) != signature(model):
        raise RuntimeError("internal error: eigendamage changed the input/output signature")
    timings["rewrite"] = time.perf_counter() - t
    after = model_costs(trace(to_graph(pruned), opset_of(pruned), tr.input_shapes))
    met = after["macs"] <= config.budget.ratio * before["macs"] * (1 + 1e-9)
    notes = []
    if not met:
        msg = (f"budget --keep-flops {config.budget.ratio:g} cannot be met with eigendamage: reached "
               f"{after['macs'] / before['macs']:.3f}")
        if not config.budget.best_effort:
            raise UserError(msg + "; use --best-effort to accept it")
        notes.append(msg)
    report = {"graphprune": __version__, "input": str(path), "output": str(out), "criterion": "eigendamage",
              "input_shapes": describe_shapes(tr.input_shapes), **_upgrade_info(model),
              "compensation": None, "budget": {"kind": "flops", "ratio": config.budget.ratio, "steps": 1},
              "budget_met": met, "notes": notes, **meta,
              "totals": {"macs_before": before["macs"], "macs_after": after["macs"],
                         "params_before": before["params"], "params_after": after["params"],
                         "macs_ratio": after["macs"] / max(before["macs"], 1.0),
                         "params_ratio": after["params"] / max(before["params"], 1.0), "channels_removed": 0},
              "layers": layers, "groups": describe_groups(tr)}
    if config.verify:
        t = time.perf_counter()
        res = compare(reference, pruned, seed=config.seed, rtol=config.rtol, **check_sizes(model, tr))
        timings["verify"] = time.perf_counter() - t
        report["verification"] = res
        if not res["ok"]:
            raise VerificationError(f"eigendamage bottlenecks differ from the projected original "
                                    f"(max rel error {res.get('max_rel_error', float('nan')):.3g}); nothing written")
    return _finish(report, before_accuracy, pruned, path, out, config, report_path, timings)


def prune(path: str | os.PathLike, out: str | os.PathLike, config: PruneConfig,
          report_path: str | os.PathLike | None = None) -> dict:
    """Trace, score, plan, compensate, rewrite, check, verify; then write OUT (and the report) atomically.
    With ``config.steps`` > 1 the budget is reached in rounds, re-collecting statistics in between."""
    timings: dict[str, float] = {}
    if config.criterion == "auto":
        config = replace(config, criterion=AUTO_CRITERION if config.calib is not None else "magnitude")
    out = Path(out)
    if out.exists() and not config.force:
        raise UserError(f"{out}: exists (use --force to overwrite)")
    if Path(path).exists() and out.exists() and out.resolve() == Path(path).resolve():
        raise UserError(f"{out}: refusing to overwrite the input model")
    if config.steps < 1:
        raise UserError(f"--steps must be >= 1, got {config.steps}")
    if config.budget.kind == "latency" and config.steps > 1:
        raise UserError("--keep-latency is planned against measurements in one round (no --steps)")
    if config.provider not in ("cpu", "cuda", "tensorrt"):
        raise UserError(f"unknown --provider {config.provider!r} (cpu, cuda, tensorrt)")
    t = time.perf_counter()
    model, tr = load_and_trace(path, config.input_shapes, config.calib)
    timings["load_and_trace"] = time.perf_counter() - t
    if config.eval_data:  # bad data is a user error before any work, not after
        from .calib import load_labelled

        load_labelled(model, config.eval_data)
    from .runtime import custom_domains

    needs_ort = config.verify or config.eval_data or config.budget.kind == "latency"
    if needs_ort and custom_domains(model):
        raise UserError(f"onnxruntime cannot run ops of the custom domain {custom_domains(model)[0]!r}, which "
                        "verification, accuracy and latency need; use --no-verify (without --eval/--keep-latency)")
    before_accuracy = _accuracy_before(model, tr, config, timings)
    n_recover = recovery_steps(config)
    if config.criterion == "eigendamage" and config.budget.kind != "lossless":
        return _eigendamage(path, out, config, report_path, model, tr, timings, before_accuracy)
    prunable = [g for g in tr.groups if g.prunable]
    log.info(f"traced {len(model.graph.node)} nodes: {len(tr.groups)} groups, {len(prunable)} prunable "
             f"({sum(g.size for g in prunable)} channels); input size {_sizes_text(tr.input_shapes)}")
    tr0, before = tr, model_costs(tr)
    alive = {_key(g): np.arange(g.size) for g in tr0.groups}
    current_model, current, rounds, compensated, latency_info = model, dict(before), [], set(), None
    recovery = _Recovery(model, tr, config, n_recover, timings) if n_recover else None
    for k in range(1, config.steps + 1):
        budget = _round_budgets(config.budget, config.steps, before, current, k)
        tag = f"round{k}_" if config.steps > 1 else ""
        if config.steps > 1:
            log.info(f"round {k}/{config.steps}: keep {budget.ratio:.3f} of the current {budget.kind}")
        res = _prune_round(current_model, tr, config, budget, timings, tag)
        for g in tr.groups:
            rem = res["plan"].removed.get(g.id)
            if rem is not None and _key(g) in alive:
                alive[_key(g)] = np.delete(alive[_key(g)], rem)
        current_model = res["pruned"]
        compensated.update(res.get("compensated_tensors", []))
        if recovery is not None and res["removed_roots"]:
            compensated.update(recovery.run(current_model, timings, tag, config.eval_data))
        if "latency" in res:
            latency_info = res["latency"]
        tr = trace(to_graph(current_model), opset_of(current_model), tr0.input_shapes)  # costs now, next round's trace
        current = model_costs(tr)
        rounds.append({"budget_ratio": budget.ratio, "macs": current["macs"], "params": current["params"],
                       "verification": res["verification"], "budget_met": res["plan"].budget_met})
    del tr  # the last trace (of the pruned model) holds arrays of its weights: only ``pruned`` is needed
    trim()
    final = res
    removed = {g.id: np.setdiff1d(np.arange(g.size), alive[_key(g)]) for g in tr0.groups
               if len(alive.get(_key(g), np.arange(g.size))) < g.size}
    pruned = current_model
    report = {
        "graphprune": __version__,
        "input": str(path),
        "output": str(out),
        "criterion": final["criterion"],
        "compensation": final["compensation"],
        "input_shapes": describe_shapes(tr0.input_shapes),
        **_upgrade_info(model),
        "budget": {"kind": config.budget.kind, "ratio": config.budget.ratio, "cap": config.budget.cap,
                   "round_to": config.budget.round_to, "steps": config.steps},
        "budget_met": final["plan"].budget_met,
        "notes": final["plan"].notes,
        "totals": {
            "macs_before": before["macs"], "macs_after": current["macs"],
            "params_before": before["params"], "params_after": current["params"],
            "macs_ratio": current["macs"] / max(before["macs"], 1.0),
            "params_ratio": current["params"] / max(before["params"], 1.0),
            "channels_removed": int(sum(len(v) for v in removed.values())),
        },
        "groups": describe_groups(tr0, removed),
    }
    for key in ("loss", "calibration", "samples", "block_size"):
        if key in final:
            report[key] = final[key]
    if compensated:
        report["compensated_tensors"] = sorted(compensated)
    if latency_info is not None:
        report["latency"] = latency_info
    if config.steps > 1:
        report["rounds"] = rounds
    if recovery is not None:
        report["recovery"] = {"steps_per_round": n_recover, "lr": config.recover_lr, "batch": config.recover_batch,
                              "rounds": recovery.rounds}
    if config.verify:
        if config.steps > 1 or final["compensation"] or compensated:
            # the report must let `graphprune verify` check ORIGINAL vs OUT on its own
            t = time.perf_counter()
            check = compare(expanded_pruned(tr0, tr0.removed_roots(removed), pruned, model), pruned,
                            seed=config.seed, rtol=config.rtol, **check_sizes(model, tr0))
            timings["verify_expanded"] = time.perf_counter() - t
            if not check["ok"]:
                raise VerificationError(f"pruned model does not match the original's channel structure "
                                        f"(max rel error {check.get('max_rel_error', float('nan')):.3g}); nothing written")
            report["verification"] = {**final["verification"], "structure": check}
        else:
            report["verification"] = final["verification"]
    return _finish(report, before_accuracy, pruned, path, out, config, report_path, timings)


def verify(original: str | os.PathLike, pruned_path: str | os.PathLike, report: dict, *, rtol: float = 1e-4,
           seed: int = 0, input_shapes=None) -> dict:
    """Rebuild the masked original from ORIGINAL and the report, compare it with PRUNED (at
    ``input_shapes``, else the size the report records, else the model's static dims)."""
    recorded = report.get("input_shapes") if isinstance(report.get("input_shapes"), dict) else None
    model, tr = load_and_trace(original, input_shapes, hint=recorded)
    pruned = load_model(pruned_path)
    if report.get("criterion") == "eigendamage":
        return _verify_eigendamage(model, tr, pruned, report, rtol=rtol, seed=seed)
    sizes = check_sizes(model, tr)
    groups = report.get("groups")
    if not isinstance(groups, list) or len(groups) != len(tr.groups):
        raise UserError("report does not describe this original model (group count differs)")
    removed: dict[int, np.ndarray] = {}
    for g, entry in zip(tr.groups, groups):
        names = [s.node for s in g.sources]
        if [s.get("node") for s in entry.get("sources", [])] != names:
            raise UserError(f"report does not describe this original model (group {g.id} sources differ)")
        rem = np.asarray(entry.get("removed", []), dtype=np.int64)
        if len(rem) and (rem.min() < 0 or rem.max() >= g.size):
            raise UserError(f"report group {g.id}: removed index out of range")
        if len(rem):
            removed[g.id] = rem
    if signature(pruned) != signature(model):
        return {"ok": False, "reason": "input/output signature differs from the original"}
    roots = tr.removed_roots(removed)
    if (report.get("compensation") or report.get("recovery") or report.get("compensated_tensors")
            or (report.get("budget") or {}).get("steps", 1) > 1):
        # kept weights were updated: tensors compensation did not touch must be exact slices of the
        # original, and the original graph carrying the pruned weights must compute the same function
        skip = report.get("compensated_tensors", [])
        if not isinstance(skip, list):
            raise UserError("report: 'compensated_tensors' must be a list")
        bad = sliced_mismatches(tr, roots, pruned, skip=set(skip))
        if bad:
            return {"ok": False, "reason": f"{len(bad)} initializers are not the original's slice for the "
                                          f"reported removal (e.g. {bad[0]!r})"}
        res = compare(expanded_pruned(tr, roots, pruned, model), pruned, seed=seed, rtol=rtol, **sizes)
        if report.get("recovery"):
            # recovery retrained the producers' rows too: which channels of a group were kept is then a
            # labelling no weight value pins down (relabelling kept channels consistently computes the
            # same function); what is checked is the structure and the function
            res["note"] = ("weights retrained by recovery: checked the channel structure (counts per group and "
                           "where every tensor is cut) and the function, not which channels of a group were kept")
        return res
    return compare(lambda: masked_view(tr, roots, model), pruned, seed=seed, rtol=rtol, **sizes)


def _verify_eigendamage(model, tr: Trace, pruned: onnx.ModelProto, report: dict, *, rtol: float, seed: int) -> dict:
    """The original carrying, for each rewritten layer, the product of its three bottleneck weights
    must compute what PRUNED computes."""
    from onnx import numpy_helper

    from . import eigendamage as ed
    from .curvature.layers import layer_views

    if signature(pruned) != signature(model):
        return {"ok": False, "reason": "input/output signature differs from the original"}
    views = layer_views(tr.graph, tr.state)
    values = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    graph = tr.graph.copy()
    tensors = graph.tensors()
    layers = report.get("layers")
    if not isinstance(layers, list):
        raise UserError("report: eigendamage report without a 'layers' list")
    for entry in layers:
        view = views.get(entry.get("layer")) if isinstance(entry, dict) else None
        if view is None or any(w not in values for w in entry.get("weights", [])) or len(entry.get("weights", [])) != 3:
            raise UserError("report does not describe this original/pruned pair (eigendamage layers differ)")
        reason = ed.check_bottleneck(values, entry, view, np.asarray(tensors[view.weight].values))
        if reason:
            return {"ok": False, "reason": reason}
        tensors[view.weight].values = ed.weights_from_bottleneck(values, entry, view).astype(np.float32)
    return compare(GraphModel(graph, model), pruned, seed=seed, rtol=rtol, **check_sizes(model, tr))
