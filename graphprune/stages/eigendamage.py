"""Stage alternative: EigenDamage, layer rewriting in the Kronecker-factored eigenbasis, in place of
channel rounds (see graphprune/eigendamage.py for the math). Statistics → per-layer decomposition →
ranks for the MACs budget → bottleneck rewrite → verify against the original carrying the projected
weights → report."""
from __future__ import annotations

import time

import numpy as np
import onnx

from ..config import PruneConfig
from ..cost import model_costs
from ..criteria import ScoringContext
from ..errors import UserError, VerificationError
from ..export import export_graph
from ..parity import compare
from ..runtime import GraphModel
from ..tracer import Trace
from .load import check_sizes, retrace, signature
from .report import describe_groups, head, totals
from .rewrite import checked
from .recover import Recovery
from .score import collect_statistics


def applies(config: PruneConfig) -> bool:
    return config.criterion == "eigendamage" and config.budget.kind != "lossless"


def run(model: onnx.ModelProto, tr: Trace, config: PruneConfig, path, out, timings: dict, *,
        recover_steps: int = 0) -> tuple[dict, onnx.ModelProto]:
    """The report (without accuracy and timings) and the rewritten model; with ``recover_steps``
    the bottleneck factors and every other weight are then distilled from the dense model."""
    from .. import eigendamage as ed

    ed.check_supported(config.budget)
    if config.steps != 1:
        raise UserError("--criterion eigendamage is one-shot (no --steps)")
    recovery = Recovery(model, tr, config, recover_steps, timings) if recover_steps else None
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
    pruned = checked(export_graph(new_graph, model), model, "eigendamage model")
    timings["rewrite"] = time.perf_counter() - t
    after = model_costs(retrace(pruned, tr))
    met = after["macs"] <= config.budget.ratio * before["macs"] * (1 + 1e-9)
    notes = []
    if not met:
        msg = (f"budget --keep-flops {config.budget.ratio:g} cannot be met with eigendamage: reached "
               f"{after['macs'] / before['macs']:.3f}")
        if not config.budget.best_effort:
            raise UserError(msg + "; use --best-effort to accept it")
        notes.append(msg)
    report = {**head(path, out, "eigendamage", None, model, tr),
              "budget": {"kind": "flops", "ratio": config.budget.ratio, "steps": 1},
              "budget_met": met, "notes": notes, **meta, "totals": totals(before, after, 0),
              "layers": layers, "groups": describe_groups(tr)}
    if config.verify:
        t = time.perf_counter()
        res = compare(reference, pruned, seed=config.seed, rtol=config.rtol, **check_sizes(model, tr))
        timings["verify"] = time.perf_counter() - t
        report["verification"] = res
        if not res["ok"]:
            raise VerificationError(f"eigendamage bottlenecks differ from the projected original "
                                    f"(max rel error {res.get('max_rel_error', float('nan')):.3g}); nothing written")
    if recovery is not None:
        recovery.allowed |= {w for entry in layers for w in entry["weights"]}
        trained = recovery.run(pruned, timings, "", config.eval_data)
        report["recovery"] = recovery.report()
        report["compensated_tensors"] = trained
        if config.verify:
            res = verify_eigendamage(model, tr, pruned, report, rtol=config.rtol, seed=config.seed)
            report["verification"] = {**report["verification"], "structure": res}
            if not res["ok"]:
                raise VerificationError(f"recovered eigendamage model does not match the original's structure "
                                        f"({res.get('reason') or res.get('max_rel_error')}); nothing written")
    return report, pruned


def verify_eigendamage(model, tr: Trace, pruned: onnx.ModelProto, report: dict, *, rtol: float, seed: int) -> dict:
    """The original carrying, for each rewritten layer, the product of its three bottleneck weights
    must compute what PRUNED computes. Without recovery the factors must also be orthonormal
    rotations around the original weight's projection and every other weight the original's; after
    recovery (which trains them all) the factors' ranks and every other weight's shape are checked,
    and the original graph carries PRUNED's trained values."""
    from onnx import numpy_helper

    from .. import eigendamage as ed
    from ..curvature.layers import layer_views

    if signature(pruned) != signature(model):
        return {"ok": False, "reason": "input/output signature differs from the original"}
    views = layer_views(tr.graph, tr.state)
    values = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    graph = tr.graph.copy()
    tensors = graph.tensors()
    layers = report.get("layers")
    if not isinstance(layers, list):
        raise UserError("report: eigendamage report without a 'layers' list")
    recovered = bool(report.get("recovery"))
    rewritten = set()
    for entry in layers:
        view = views.get(entry.get("layer")) if isinstance(entry, dict) else None
        if view is None or any(w not in values for w in entry.get("weights", [])) or len(entry.get("weights", [])) != 3:
            raise UserError("report does not describe this original/pruned pair (eigendamage layers differ)")
        if recovered:
            reason = ed.check_ranks(values, entry, view)
        else:
            reason = ed.check_bottleneck(values, entry, view, np.asarray(tensors[view.weight].values))
        if reason:
            return {"ok": False, "reason": reason}
        tensors[view.weight].values = ed.weights_from_bottleneck(values, entry, view).astype(np.float32)
        rewritten.add(view.weight)
    if recovered:
        trained = report.get("compensated_tensors", [])
        if not isinstance(trained, list):
            raise UserError("report: 'compensated_tensors' must be a list")
        for name, t in tensors.items():
            if not hasattr(t, "values") or name in rewritten or name not in values:
                continue
            if np.shape(t.values) != values[name].shape:
                return {"ok": False, "reason": f"initializer {name!r} changed shape"}
            if name in trained:
                t.values = values[name]
            elif not np.array_equal(np.asarray(t.values), values[name]):
                return {"ok": False, "reason": f"initializer {name!r} is not the original's and not reported as trained"}
    res = compare(GraphModel(graph, model), pruned, seed=seed, rtol=rtol, **check_sizes(model, tr))
    if recovered:
        res["note"] = ("weights retrained by recovery: checked each layer's bottleneck ranks and the function of "
                       "the original structure carrying the trained weights, not their relation to the original values")
    return res
