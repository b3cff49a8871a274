"""Budget planner: turn per-unit scores into a plan (group -> removed unit indices)."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from .cost import CostModel
from .errors import UserError
from .tracer import Trace


@dataclass
class Budget:
    """kind: "flops" (keep at most ratio × MACs), "params", "channels" (uniform ratio per group),
    or "lossless" (remove every unit scored 0, no target)."""

    kind: str
    ratio: float = 1.0
    cap: float = 0.9  # at most this fraction of any group is removed (never all of it)
    round_to: int = 1  # kept widths (in channels) rounded to a multiple of this
    best_effort: bool = False  # prune as far as possible instead of failing when unreachable

    def __post_init__(self) -> None:
        if self.kind not in ("flops", "params", "channels", "lossless", "latency"):
            raise UserError(f"unknown budget kind {self.kind!r}")
        if self.kind != "lossless" and not 0.0 < self.ratio <= 1.0:
            raise UserError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.cap < 1.0:
            raise UserError(f"--max-group-removal must be in [0, 1), got {self.cap}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")


@dataclass
class Plan:
    removed: dict[int, np.ndarray]
    before: dict[str, float]
    after: dict[str, float]
    budget_met: bool
    notes: list[str] = field(default_factory=list)


def _step(group, round_to: int) -> int:
    return round_to // math.gcd(round_to, group.channels_per_unit)


def _blocks(order: np.ndarray, n: int, step: int, max_remove: int) -> list[np.ndarray]:
    """Removal blocks in score order so every prefix leaves a kept width that is a multiple of step."""
    out, start = [], 0
    first = n % step if step > 1 else 1
    size = first or step
    while start + size <= max_remove:
        out.append(order[start:start + size])
        start += size
        size = step
    return out


def make_plan(trace: Trace, scores: dict[int, np.ndarray], budget: Budget, latency_table=None) -> Plan:
    """latency_table (graphprune.latency.LatencyTable) is required for budget kind "latency": the
    ratio then applies to the sum of the measured per-layer latencies."""
    cm = CostModel(trace)
    if budget.kind == "latency":
        if latency_table is None:
            raise ValueError("a latency budget needs a latency table")
        if not cm.add_latency(latency_table):
            raise UserError("--keep-latency: no layer with known shapes to time (shape inference failed?)")
    before = dict(cm.totals)
    removed: dict[int, list[int]] = {}
    queues: dict[int, list[np.ndarray]] = {}
    for g in trace.groups:
        if not g.prunable or g.id not in scores:
            continue
        s = np.asarray(scores[g.id], dtype=np.float64)
        if len(s) != g.size:
            raise ValueError(f"criterion returned {len(s)} scores for group {g.id} of size {g.size}")
        max_remove = min(int(math.floor(budget.cap * g.size)), g.size - g.min_keep)
        order = np.argsort(s, kind="stable")
        if budget.kind == "lossless":
            order = order[s[order] == 0]  # proven-zero units only, no cap: removing them changes nothing
            max_remove = min(g.size - g.min_keep, len(order))
        queues[g.id] = _blocks(order, g.size, _step(g, budget.round_to), max_remove)

    taken: dict[int, list[np.ndarray]] = {}  # per group, the blocks removed, in order

    def take(gid: int, block: np.ndarray) -> bool:
        roots = trace.groups[gid].units[block]
        if not cm.allowed(roots):
            return False
        cm.remove(roots)
        removed.setdefault(gid, []).extend(block.tolist())
        taken.setdefault(gid, []).append(block)
        return True

    if budget.kind in ("channels", "lossless"):
        for gid, blocks in queues.items():
            n = trace.groups[gid].size
            target = n - math.ceil(budget.ratio * n) if budget.kind == "channels" else n
            for block in blocks:
                if len(removed.get(gid, ())) + len(block) > target or not take(gid, block):
                    break
        met = True
    else:
        kind = {"flops": "macs", "params": "params", "latency": "latency"}[budget.kind]
        target = budget.ratio * before[kind]
        met = _greedy(trace, scores, queues, cm, kind, target, take)
        if met:
            _refill(trace, scores, taken, removed, cm, kind, target)
    plan = Plan({g: np.array(sorted(v), dtype=np.int64) for g, v in removed.items() if v},
                before, dict(cm.totals), met)
    if not met:
        kind = {"flops": "macs", "params": "params", "latency": "latency"}[budget.kind]
        frozen = _frozen_share(trace, cm, kind)
        msg = (f"budget --keep-{budget.kind} {budget.ratio:g} cannot be met: the best reachable is "
               f"{cm.totals[kind] / before[kind]:.3f} ({frozen:.0%} of {kind} sit in frozen groups or fixed "
               f"layers; per-group cap {budget.cap:g})")
        if not budget.best_effort:
            raise UserError(msg + "; use --best-effort to prune as far as possible")
        plan.notes.append(msg)
    return plan


def _greedy(trace, scores, queues, cm: CostModel, kind: str, target: float, take) -> bool:
    """Lazy greedy: remove the block with the lowest score per unit of cost saved, re-checking a
    block's ratio when it reaches the top (savings shrink as neighbouring layers shrink)."""

    def priority(gid: int, block: np.ndarray) -> float:
        saving = -cm.delta(trace.groups[gid].units[block], kind)
        s = float(np.sum(scores[gid][block]))
        return math.inf if saving <= 0 else s / saving

    heap = [(priority(g, b[0]), g, 0) for g, b in queues.items() if b]
    heapq.heapify(heap)
    while heap and cm.totals[kind] > target:
        p, gid, k = heapq.heappop(heap)
        block = queues[gid][k]
        fresh = priority(gid, block)
        if fresh > p and heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, gid, k))
            continue
        if math.isinf(fresh) or not take(gid, block):
            continue
        if k + 1 < len(queues[gid]):
            heapq.heappush(heap, (priority(gid, queues[gid][k + 1]), gid, k + 1))
    return cm.totals[kind] <= target * (1 + 1e-9)


def _refill(trace, scores, taken, removed, cm: CostModel, kind: str, target: float) -> None:
    """The greedy pass stops at the first block that crosses the target; a coarse block (a whole
    attention head, a wide tile) can overshoot it by a lot. Put back the most valuable removed
    blocks (highest score per unit of cost) that still fit under the target, last-removed block of
    a group first so every group's removal stays a prefix of its score order."""
    while True:
        best, best_p = None, -math.inf
        for gid, blocks in taken.items():
            if not blocks:
                continue
            roots = trace.groups[gid].units[blocks[-1]]
            extra = cm.delta(roots, kind, sign=+1)
            if cm.totals[kind] + extra > target * (1 + 1e-9):
                continue
            p = math.inf if extra <= 0 else float(np.sum(scores[gid][blocks[-1]])) / extra
            if p > best_p:
                best, best_p = gid, p
        if best is None:
            return
        block = taken[best].pop()
        cm.restore(trace.groups[best].units[block])
        drop = set(block.tolist())
        removed[best] = [u for u in removed[best] if u not in drop]


def _frozen_share(trace: Trace, cm: CostModel, kind: str) -> float:
    """Fraction of the original cost that no prunable group can touch."""
    prunable_roots = set()
    for g in trace.groups:
        if g.prunable:
            prunable_roots.update(g.units.tolist())
    fixed = 0.0
    for t in cm._terms(kind):
        if not any(set(cm.arrays[a].tolist()) & prunable_roots for a in t.arrays):
            fixed += t.value([len(cm.arrays[a]) for a in t.arrays])
    return fixed / max(cm.full[kind], 1.0)
