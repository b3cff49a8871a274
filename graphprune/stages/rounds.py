"""Channel pruning in rounds: for each of ``--steps`` rounds, score → plan → compensate → rewrite →
verify → recover, then re-trace the pruned model for the next round; at the end the structural
check and the report. (The alternative method is stages/eigendamage.py.)"""
from __future__ import annotations

import numpy as np
import onnx

from .. import log
from ..config import PruneConfig
from ..cost import model_costs
from ..memory import trim
from ..shapes import text as sizes_text
from ..planner import Budget
from ..tracer import Trace
from .load import retrace
from .latency import LatencyRound
from .plan import ChannelRound, round_budgets
from .recover import Recovery
from .report import describe_groups, head, totals
from .score import score
from .verify import verify_structure


def round_for(budget: Budget, config: PruneConfig):
    """The round that plans ``budget``: LatencyRound for --keep-latency, else ChannelRound."""
    if budget.kind == "latency":
        return LatencyRound(config)
    return ChannelRound(config)


def _key(group) -> str:
    return group.sources[0].node


def run(model: onnx.ModelProto, tr: Trace, config: PruneConfig, path, out, timings: dict, *,
        recover_steps: int = 0) -> tuple[dict, onnx.ModelProto]:
    """The report (without accuracy and timings) and the pruned model."""
    prunable = [g for g in tr.groups if g.prunable]
    log.info(f"traced {len(model.graph.node)} nodes: {len(tr.groups)} groups, {len(prunable)} prunable "
             f"({sum(g.size for g in prunable)} channels); input size {sizes_text(tr.input_shapes)}")
    tr0, before = tr, model_costs(tr)
    alive = {_key(g): np.arange(g.size) for g in tr0.groups}  # original channel indices still kept
    current_model, current, rounds, compensated, latency_info = model, dict(before), [], set(), None
    recovery = Recovery(model, tr, config, recover_steps, timings) if recover_steps else None
    for k in range(1, config.steps + 1):
        budget = round_budgets(config.budget, config.steps, before, current, k)
        tag = f"round{k}_" if config.steps > 1 else ""
        if config.steps > 1:
            log.info(f"round {k}/{config.steps}: keep {budget.ratio:.3f} of the current {budget.kind}")
        scoring = score(current_model, tr, config, budget, timings, tag)
        res = round_for(budget, config).run(current_model, tr, scoring, budget, timings, tag)
        for note in res.plan.notes:
            log.warn(note)
        for g in tr.groups:
            rem = res.plan.removed.get(g.id)
            if rem is not None and _key(g) in alive:
                alive[_key(g)] = np.delete(alive[_key(g)], rem)
        current_model = res.pruned
        compensated.update(res.compensation.tensors)
        if recovery is not None and res.removed_roots:
            compensated.update(recovery.run(current_model, timings, tag, config.eval_data))
        if res.latency is not None:
            latency_info = res.latency
        tr = retrace(current_model, tr0)  # costs now, next round's trace
        current = model_costs(tr)
        rounds.append({"budget_ratio": budget.ratio, "macs": current["macs"], "params": current["params"],
                       "verification": res.verification, "budget_met": res.plan.budget_met})
    del tr  # the last trace (of the pruned model) holds arrays of its weights: only ``pruned`` is needed
    trim()
    removed = {g.id: np.setdiff1d(np.arange(g.size), alive[_key(g)]) for g in tr0.groups
               if len(alive.get(_key(g), np.arange(g.size))) < g.size}
    pruned = current_model
    report = {
        **head(path, out, scoring.criterion.name, scoring.method, model, tr0),
        "budget": {"kind": config.budget.kind, "ratio": config.budget.ratio, "cap": config.budget.cap,
                   "round_to": config.budget.round_to, "steps": config.steps},
        "budget_met": res.plan.budget_met,
        "notes": res.plan.notes,
        "totals": totals(before, current, int(sum(len(v) for v in removed.values()))),
        "groups": describe_groups(tr0, removed),
    }
    for key in ("loss", "calibration", "samples", "block_size"):
        if key in scoring.meta:
            report[key] = scoring.meta[key]
    if compensated:
        report["compensated_tensors"] = sorted(compensated)
    if latency_info is not None:
        report["latency"] = latency_info
    if res.plan.snapped:  # --round-to auto: per group the planned, snapped and final widths
        report["widths"] = {"groups": res.plan.snapped, **res.plan.snap_info}
    if config.steps > 1:
        report["rounds"] = rounds
    if recovery is not None:
        report["recovery"] = recovery.report()
    if config.verify:
        if config.steps > 1 or scoring.method or compensated:
            # the report must let `graphprune verify` check ORIGINAL vs OUT on its own
            check = verify_structure(tr0, removed, model, pruned, seed=config.seed, rtol=config.rtol,
                                     timings=timings)
            report["verification"] = {**res.verification, "structure": check}
        else:
            report["verification"] = res.verification
    return report, pruned
