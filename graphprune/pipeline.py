"""The Python API: inspect, prune, verify. The CLI is a thin layer over these functions."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__, log
from .cost import model_costs
from .criteria import ScoringContext, make_criterion
from .errors import UserError, VerificationError
from .io import check_output, load_model, opset_of, save_model, write_json_atomic
from .planner import Budget, make_plan
from .rewriter import apply_plan, masked_original
from .runtime import run, session
from .tracer import Trace, to_graph, trace
from .verify import compare


@dataclass
class PruneConfig:
    criterion: str = "magnitude"
    budget: Budget = field(default_factory=lambda: Budget("flops", 0.5))
    verify: bool = True
    rtol: float = 1e-4
    seed: int = 0
    force: bool = False
    eval_data: str | None = None


def load_and_trace(path: str | os.PathLike) -> tuple[onnx.ModelProto, Trace]:
    model = load_model(path)
    return model, trace(to_graph(model), opset_of(model))


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


def inspect(path: str | os.PathLike) -> dict:
    t0 = time.perf_counter()
    model, tr = load_and_trace(path)
    elapsed = time.perf_counter() - t0
    costs = model_costs(tr)
    groups = describe_groups(tr)
    return {
        "model": str(path),
        "opset": opset_of(model),
        "nodes": len(model.graph.node),
        "macs": costs["macs"],
        "params": costs["params"],
        "groups": groups,
        "prunable_groups": sum(g["prunable"] for g in groups),
        "prunable_channels": sum(g["size"] for g in groups if g["prunable"]),
        "trace_seconds": round(elapsed, 4),
    }


def evaluate(model: onnx.ModelProto, data_path: str | os.PathLike) -> float:
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


def prune(path: str | os.PathLike, out: str | os.PathLike, config: PruneConfig,
          report_path: str | os.PathLike | None = None) -> dict:
    """Trace, score, plan, rewrite, check, verify; then write OUT (and the report) atomically."""
    timings: dict[str, float] = {}
    out = Path(out)
    if out.exists() and not config.force:
        raise UserError(f"{out}: exists (use --force to overwrite)")
    if Path(path).exists() and out.exists() and out.resolve() == Path(path).resolve():
        raise UserError(f"{out}: refusing to overwrite the input model")
    t = time.perf_counter()
    model, tr = load_and_trace(path)
    timings["load_and_trace"] = time.perf_counter() - t
    if config.eval_data:  # bad data is a user error before any work, not after
        from .calib import load_labelled

        load_labelled(model, config.eval_data)
    prunable = [g for g in tr.groups if g.prunable]
    log.info(f"traced {len(model.graph.node)} nodes: {len(tr.groups)} groups, {len(prunable)} prunable "
             f"({sum(g.size for g in prunable)} channels)")
    crit_name = "lossless" if config.budget.kind == "lossless" else config.criterion
    criterion = make_criterion(crit_name)
    t = time.perf_counter()
    scores = criterion.score(ScoringContext(tr))
    timings["score"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(tr, scores, config.budget)
    timings["plan"] = time.perf_counter() - t
    for note in plan.notes:
        log.warn(note)
    removed_roots = tr.removed_roots(plan.removed)
    t = time.perf_counter()
    pruned = apply_plan(tr, removed_roots, model)
    pruned = onnx.shape_inference.infer_shapes(pruned)
    try:
        check_output(pruned)
    except Exception as exc:  # a bug, never the user's fault: keep the traceback
        raise RuntimeError(f"internal error: pruned model fails onnx.checker: {exc}") from exc
    timings["rewrite"] = time.perf_counter() - t
    if signature(pruned) != signature(model):
        raise RuntimeError("internal error: pruned model changed the input/output signature")
    after_tr = trace(to_graph(pruned), opset_of(pruned))
    after = model_costs(after_tr)
    report = {
        "graphprune": __version__,
        "input": str(path),
        "output": str(out),
        "criterion": crit_name,
        "budget": {"kind": config.budget.kind, "ratio": config.budget.ratio, "cap": config.budget.cap,
                   "round_to": config.budget.round_to},
        "budget_met": plan.budget_met,
        "notes": plan.notes,
        "totals": {
            "macs_before": plan.before["macs"], "macs_after": after["macs"],
            "params_before": plan.before["params"], "params_after": after["params"],
            "macs_ratio": after["macs"] / max(plan.before["macs"], 1.0),
            "params_ratio": after["params"] / max(plan.before["params"], 1.0),
            "channels_removed": int(sum(len(v) for v in plan.removed.values())),
        },
        "groups": describe_groups(tr, plan.removed),
    }
    if config.verify:
        t = time.perf_counter()
        result = compare(masked_original(tr, removed_roots, model), pruned, seed=config.seed, rtol=config.rtol)
        timings["verify"] = time.perf_counter() - t
        report["verification"] = result
        if not result["ok"]:
            raise VerificationError(f"pruned model differs from the masked original "
                                    f"(max rel error {result.get('max_rel_error', float('nan')):.3g}); nothing written")
    if config.eval_data:
        t = time.perf_counter()
        report["accuracy"] = {"before": evaluate(model, config.eval_data), "after": evaluate(pruned, config.eval_data)}
        timings["evaluate"] = time.perf_counter() - t
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    save_model(pruned, out, src=path, force=config.force)
    if report_path is not None:
        try:
            write_json_atomic(report, report_path)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return report


def verify(original: str | os.PathLike, pruned_path: str | os.PathLike, report: dict, *, rtol: float = 1e-4,
           seed: int = 0) -> dict:
    """Rebuild the masked original from ORIGINAL and the report, compare it with PRUNED."""
    model, tr = load_and_trace(original)
    pruned = load_model(pruned_path)
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
    masked = masked_original(tr, tr.removed_roots(removed), model)
    return compare(masked, pruned, seed=seed, rtol=rtol)
