"""Stage: plan, and the round that carries a plan through compensate → rewrite → verify.

A round turns scores into a pruned model. ``ChannelRound`` plans against a budget of MACs, params or
channels; ``LatencyRound`` (stages/latency.py) plans against measured latency and re-plans until the
measurement lands. Both return a ``RoundResult``; stages/rounds.py picks one for each round's budget."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import onnx

from ..config import PruneConfig
from ..planner import Budget, Plan, make_plan
from ..tracer import Trace
from .compensate import Compensation, compensate
from .rewrite import rewrite
from .score import Scoring
from .verify import verify_round


@dataclass
class RoundResult:
    plan: Plan
    pruned: onnx.ModelProto
    removed_roots: object
    compensation: Compensation
    verification: dict | None
    latency: dict | None = None  # LatencyRound's measurements
    notes: list[str] = field(default_factory=list)


def apply_round(model: onnx.ModelProto, tr: Trace, scoring: Scoring, plan: Plan, config: PruneConfig,
                timings: dict, tag: str = "") -> RoundResult:
    """compensate → rewrite → verify for one plan. Compensation writes into ``tr.graph``;
    ``result.compensation.undo(tr)`` restores the original values."""
    removed_roots = tr.removed_roots(plan.removed)
    done = compensate(tr, scoring, removed_roots, config.damping, timings, tag)
    pruned = rewrite(tr, removed_roots, model, timings, tag)
    result = (verify_round(tr, removed_roots, model, pruned, seed=config.seed, rtol=config.rtol, timings=timings,
                           tag=tag) if config.verify else None)
    return RoundResult(plan, pruned, removed_roots, done, result)


class ChannelRound:
    """Plan against a budget of MACs ("flops"), params or channels, then apply."""

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, model: onnx.ModelProto, tr: Trace, scoring: Scoring, budget: Budget, timings: dict,
            tag: str = "") -> RoundResult:
        t = time.perf_counter()
        plan = make_plan(tr, scoring.scores, budget)
        timings[tag + "plan"] = time.perf_counter() - t
        return apply_round(model, tr, scoring, plan, self.config, timings, tag)


def round_budgets(budget: Budget, steps: int, before: dict, current: dict, k: int) -> Budget:
    """Budget for round k (1-based) of ``steps``, relative to the current model: the remaining
    reduction is spread evenly over the rounds (MACs/params), geometrically for channels."""
    if steps == 1 or budget.kind == "lossless":
        return budget
    cap = 1 - (1 - budget.cap) ** (1 / steps)
    if budget.kind == "channels":
        ratio = budget.ratio ** (1 / steps)
    else:
        kind = "macs" if budget.kind == "flops" else "params"
        target = 1 - (1 - budget.ratio) * k / steps
        ratio = min(1.0, target * before[kind] / max(current[kind], 1.0))
    return replace(budget, ratio=ratio, cap=cap)  # every other setting (widths, hardware) carried over
