"""Budget planner: turn per-unit scores into a plan (group -> removed unit indices)."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

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
    #: kept widths (in channels) rounded to a multiple of this; "auto": each group's width snapped to
    #: the fastest width not above the planned one, from measured per-layer latency staircases, and
    #: channels chosen by loss per measured millisecond saved; None: "auto" for a latency budget, else 1
    round_to: int | str | None = None
    best_effort: bool = False  # prune as far as possible instead of failing when unreachable
    #: where "auto" measures: LatencyTable keyword arguments (provider, batch, cache, threads,
    #: precision); None: CPU provider, batch 8, the default cache
    hardware: dict | None = None

    def __post_init__(self) -> None:
        if self.round_to is None:
            self.round_to = "auto" if self.kind == "latency" else 1
        if isinstance(self.round_to, str):
            if self.round_to.strip().lower() != "auto":
                try:
                    self.round_to = int(self.round_to)
                except ValueError:
                    raise UserError(f"--round-to must be a positive integer or auto, got {self.round_to!r}") from None
            else:
                self.round_to = "auto"
        if self.kind not in ("flops", "params", "channels", "lossless", "latency"):
            raise UserError(f"unknown budget kind {self.kind!r}")
        if self.kind != "lossless" and not 0.0 < self.ratio <= 1.0:
            raise UserError(f"budget ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.cap < 1.0:
            raise UserError(f"--max-group-removal must be in [0, 1), got {self.cap}")
        if self.round_to != "auto" and self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")


@dataclass
class Plan:
    removed: dict[int, np.ndarray]
    before: dict[str, float]
    after: dict[str, float]
    budget_met: bool
    notes: list[str] = field(default_factory=list)
    #: with round_to "auto": per group {"group", "planned", "snapped", "final"} widths (channels) and
    #: the candidate widths' measured latency (ms, summed over the group's layers)
    snapped: list[dict] = field(default_factory=list)
    snap_info: dict = field(default_factory=dict)


#: round_to "auto" under a MACs or params budget: rank channels by loss per measured millisecond saved
#: (a MAC removed from a narrow, high-resolution layer buys far less time than one removed from a wide
#: layer), stopping when the budget is met
RANK_BY_LATENCY = True
RANK_BUDGET_WEIGHT = 0.05
#: how far (fraction of a group's width) the greedy pass looks past a block that saves no time
LOOKAHEAD = 0.5
#: a latency plan made with fill=True: at most this many exchanges (one block back, others out), and
#: how far under its target a plan counts as landed (then only a lower removed score improves it)
EXCHANGE_ROUNDS = 8
FILL_BAND = 0.04


def _step(group, round_to, blocks: dict) -> int:
    if round_to == "auto":  # planned per unit, snapped to measured widths afterwards
        # except groups that reach a Conv on a CPU with blocked (NCHWc) kernels: see channel_blocks
        return blocks.get(group.id, (1, 0))[0]
    return round_to // math.gcd(round_to, group.channels_per_unit)


def channel_blocks(trace: Trace, block: int) -> dict[int, tuple[int, int]]:
    """``--round-to auto`` on a CPU whose blocked (NCHWc) convolutions work in ``block`` channels:
    per group whose channels reach a Conv and that is at least one block wide, (step, floor) in
    units: it keeps at least one whole block (onnxruntime gives a conv with fewer input channels
    than a block plain-layout input, and the graph gains a layout reorder that a layer timed alone
    does not show), and a group that is a whole number of blocks is planned in whole blocks (a width
    between two blocks costs what the upper one does). Measured on a YOLOv8n-sized detector at 640,
    batch 8, side by side: free widths x1.39, whole blocks x1.44 at the same MACs (26 against the
    dense 22 reorders with free widths)."""
    if block <= 1:
        return {}
    conv_roots: set[int] = set()
    for layer in trace.state.layers:
        if layer.op == "Conv":
            for ids in (layer.out_ids, layer.in_ids):
                if ids is not None:
                    conv_roots.update(trace.roots[np.asarray(ids, dtype=np.int64)].tolist())
    out = {}
    for g in trace.groups:
        cpu = g.channels_per_unit
        width = g.size * cpu
        if width >= block and conv_roots.intersection(g.units.tolist()):
            step = block // math.gcd(block, cpu) if width % block == 0 else 1
            out[g.id] = (step, -(-block // cpu))
    return out


def _max_remove(g, budget, blocks: dict) -> int:
    floor = max(g.min_keep, blocks.get(g.id, (1, 0))[1])
    return max(0, min(int(math.floor(budget.cap * g.size)), g.size - floor))


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


def make_plan(trace: Trace, scores: dict[int, np.ndarray], budget: Budget, latency_table=None,
              channel_floor: bool = True, fill: bool = False) -> Plan:
    """latency_table (graphprune.latency.LatencyTable) is required for budget kind "latency": the
    ratio then applies to the sum of the measured per-layer latencies.

    With round_to "auto" on a CPU with blocked (NCHWc) kernels, groups keep whole blocks and at least
    one (``channel_blocks``); when that floor leaves the budget out of reach (narrow models: the sample
    zoo's 16-64-channel layers at 32x32), the plan is made again without it, in free widths snapped
    to the measured staircases, and ``snap_info["channel_floor_relaxed"]`` says so.
    ``channel_floor`` False: free widths from the start (--keep-latency, once one attempt needed them,
    stays with them: the two kinds of plan respond differently to the layer budget).
    ``fill`` (latency budgets): after the greedy pass, exchange removed blocks for blocks of other
    groups while that brings the plan's latency closer under the budget (``_exchange``), and with
    round_to "auto" whole staircase steps again after snapping (``_exchange_steps``)."""
    if budget.round_to != "auto" or budget.kind in ("lossless", "channels"):
        return _make_plan(trace, scores, budget, latency_table, True, fill)
    own_table = None
    if latency_table is None:
        from .latency import LatencyTable

        latency_table = own_table = LatencyTable(**(budget.hardware or {}), shapes=trace.input_shapes)
    plan = _make_plan(trace, scores, replace(budget, best_effort=True), latency_table, channel_floor, fill)
    if not channel_floor:
        plan.snap_info["channel_floor_relaxed"] = True
        plan.notes.append(f"--round-to auto: planned in free widths: an earlier --keep-latency attempt could not meet "
                          f"its layer budget in whole {getattr(latency_table, 'channel_block', 1)}-channel blocks")
    elif not plan.budget_met and plan.snap_info.get("groups_floored"):
        free = _make_plan(trace, scores, replace(budget, best_effort=True), latency_table, False, fill)
        kind = {"flops": "macs", "params": "params", "latency": "latency"}[budget.kind]
        if free.budget_met or free.after[kind] < plan.after[kind]:
            free.snap_info["channel_floor_relaxed"] = True
            free.notes.append(f"--round-to auto: keeping whole {plan.snap_info.get('channel_block')}-channel "
                              f"blocks left the budget out of reach ({plan.after[kind] / plan.before[kind]:.3f}); "
                              "planned in free widths instead")
            plan = free
    if own_table is not None:
        own_table.save()
    if not plan.budget_met and not budget.best_effort:
        raise UserError(plan.notes[0] + "; use --best-effort to prune as far as possible")
    return plan


def _make_plan(trace: Trace, scores: dict[int, np.ndarray], budget: Budget, latency_table, floor: bool,
               fill: bool = False) -> Plan:
    """make_plan's plan; floor: whole NCHWc blocks and at least one per group (``channel_blocks``);
    fill: see make_plan."""
    cm = CostModel(trace)
    own_table = None  # a table made here (round_to "auto" without one given) is saved here
    if budget.kind == "latency":
        if latency_table is None:
            raise ValueError("a latency budget needs a latency table")
        if not cm.add_latency(latency_table):
            raise UserError("--keep-latency: no layer with known shapes to time (shape inference failed?)")
    before = dict(cm.totals)
    removed: dict[int, list[int]] = {}
    queues: dict[int, list[np.ndarray]] = {}
    blocks: dict[int, tuple[int, int]] = {}
    if budget.round_to == "auto" and budget.kind != "lossless":
        from .latency import LatencyTable

        if latency_table is None:
            latency_table = own_table = LatencyTable(**(budget.hardware or {}), shapes=trace.input_shapes)
        if floor:
            blocks = channel_blocks(trace, int(getattr(latency_table, "channel_block", 1) or 1))
    for g in trace.groups:
        if not g.prunable or g.id not in scores:
            continue
        s = np.asarray(scores[g.id], dtype=np.float64)
        if len(s) != g.size:
            raise ValueError(f"criterion returned {len(s)} scores for group {g.id} of size {g.size}")
        max_remove = _max_remove(g, budget, blocks)
        order = np.argsort(s, kind="stable")
        if budget.kind == "lossless":
            order = order[s[order] == 0]  # proven-zero units only, no cap: removing them changes nothing
            max_remove = min(g.size - g.min_keep, len(order))
        queues[g.id] = _blocks(order, g.size, _step(g, budget.round_to, blocks), max_remove)

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
        rank = None
        if budget.round_to == "auto" and kind != "latency" and RANK_BY_LATENCY:
            if cm.add_latency(latency_table):
                rank = "latency"
        met = _greedy(trace, scores, queues, cm, kind, target, take, rank)
        if met:
            _refill(trace, scores, taken, removed, cm, kind, target)
            if fill and kind == "latency":
                _exchange(trace, scores, queues, taken, removed, cm, kind, target, take)
    snapped, snap_info = [], {}
    if budget.round_to == "auto" and budget.kind != "lossless" and removed:
        kind = {"flops": "macs", "params": "params", "latency": "latency"}.get(budget.kind)
        target = budget.ratio * before[kind] if kind else None
        snapped, snap_info = _snap(trace, scores, removed, cm, budget, kind, target if met else None, latency_table,
                                   blocks, fill)
    if own_table is not None:
        own_table.save()
    plan = Plan({g: np.array(sorted(v), dtype=np.int64) for g, v in removed.items() if v},
                before, dict(cm.totals), met, snapped=snapped, snap_info=snap_info)
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


def _greedy(trace, scores, queues, cm: CostModel, kind: str, target: float, take, rank: str | None = None,
            start: dict[int, int] | None = None, exclude=()) -> bool:
    """Lazy greedy: remove the block with the lowest score per unit of cost saved (``rank``: the cost
    the ranking uses, default ``kind``), re-checking a block's ratio when it reaches the top (savings
    shrink as neighbouring layers shrink), until ``kind`` is at most ``target``. ``start``: per group,
    the queue position to go on from (blocks before it are already removed); ``exclude``: groups
    left alone."""
    rank = rank or kind

    def saved(roots) -> float:
        if rank == kind:
            return -cm.delta(roots, kind)
        # measured time first; a little of the budget's own cost so that blocks whose measured saving
        # is nil (flat or noisy tables) still count for what they save of the budget
        time_saved = max(0.0, -cm.delta(roots, rank)) / max(cm.full[rank], 1e-12)
        return time_saved + RANK_BUDGET_WEIGHT * -cm.delta(roots, kind) / max(cm.full[kind], 1e-12)

    def priority(gid: int, k: int) -> tuple[float, int]:
        """(loss per unit of cost saved, j): blocks k..j of the group's queue taken together, j the
        first at which the saving turns positive. On a measured staircase the first channels of a wide
        step save nothing (or cost time: the layer leaves its blocked layout) until the next step is
        reached; looking ahead up to LOOKAHEAD of the group's width lets the plan walk down the steps."""
        g, q = trace.groups[gid], queues[gid]
        limit = max(1, math.ceil(LOOKAHEAD * g.size))
        roots, s, n = [], 0.0, 0
        for j in range(k, len(q)):
            roots.append(g.units[q[j]])
            s += float(np.sum(scores[gid][q[j]]))
            n += len(q[j])
            saving = saved(np.concatenate(roots) if len(roots) > 1 else roots[0])
            if saving > 0:
                return s / saving, j
            if n >= limit:
                break
        return math.inf, k

    start = start or {}
    heap = [(p, g, k, j) for g, b in queues.items() if g not in exclude
            for k in [start.get(g, 0)] if k < len(b) for p, j in [priority(g, k)]]
    heapq.heapify(heap)
    while heap and cm.totals[kind] > target:
        p, gid, k, _ = heapq.heappop(heap)
        fresh, j = priority(gid, k)
        if fresh > p and heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, gid, k, j))
            continue
        if math.isinf(fresh) or not take(gid, queues[gid][k]):
            continue
        if any(not take(gid, queues[gid][m]) for m in range(k + 1, j + 1)):
            continue  # a tensor would lose its last channel: the group stops here
        if j + 1 < len(queues[gid]):
            nxt, jn = priority(gid, j + 1)
            heapq.heappush(heap, (nxt, gid, j + 1, jn))
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


def _fill_key(total: float, scores, removed: dict, target: float) -> tuple:
    """How good a fill plan is (larger is better): within FILL_BAND under the target first, then the
    lower removed score there, else the higher cost; the cost last."""
    score = sum(float(np.sum(np.asarray(scores[g])[np.asarray(u, dtype=np.int64)])) for g, u in removed.items())
    in_band = total >= (1 - FILL_BAND) * target
    return (in_band, -score if in_band else total, total)


def _fill_better(k: tuple, base: tuple) -> bool:
    if k[0] != base[0]:
        return k[0]
    return k[1] > base[1] + 1e-9 * max(abs(base[1]), 1e-12)


def _exchange_rounds(candidates, attempt, undo, key) -> int:
    """The loop both exchange passes share: each round applies every candidate's exchange
    (``attempt`` returns what ``undo`` takes, or None when it applied nothing), measures it with
    ``key``, undoes it, then applies the best one if it beats the plan (``_fill_better``); rounds
    end when none does or after EXCHANGE_ROUNDS. Returns the exchanges kept."""
    kept = 0
    for _ in range(EXCHANGE_ROUNDS):
        base, best, best_key = key(), None, None
        for c in candidates():
            entry = attempt(c)
            if entry is None:
                continue
            k = key()
            undo(entry)
            if _fill_better(k, base) and (best_key is None or k > best_key):
                best, best_key = c, k
        if best is None:
            break
        entry = attempt(best)  # deterministic: the exchange found above
        if entry is None or not _fill_better(key(), base):
            if entry is not None:
                undo(entry)
            break
        kept += 1
    return kept


def _exchange(trace, scores, queues, taken, removed, cm: CostModel, kind: str, target: float, take) -> int:
    """Land a plan close under its target where the greedy pass and the refill leave it far below on
    coarse staircases. Neither ever swaps: at a latency budget between two reachable plans the greedy
    pass takes the block that saves most per unit of score (the sample zoo's SiLU-net: one 16-channel
    block of a residual group, 0.68 of the layers' time), the refill finds nothing that fits back,
    and every budget from 0.70 to 0.77 gives that one plan, though a block of another group plus
    blocks of a third land at 0.71-0.76. An exchange puts back the last block removed from one group
    and removes blocks of the others (the greedy pass, lowest score per time saved first) until the
    target holds again. Of all groups' exchanges the best is kept, while one improves the plan: a
    plan within FILL_BAND under the target beats one further below, and within the band the lower
    removed score wins (outside it, the higher cost). Every group's removal stays a prefix of its
    queue. Returns the number of exchanges kept."""
    def attempt(gid: int):
        """Apply gid's exchange; the entry that undoes it, or None (nothing applied) when the other
        groups cannot pay for the block put back."""
        block = taken[gid].pop()
        cm.restore(trace.groups[gid].units[block])
        drop = set(block.tolist())
        removed[gid] = [u for u in removed[gid] if u not in drop]
        journal = []

        def take_logged(g: int, b: np.ndarray) -> bool:
            if not take(g, b):
                return False
            journal.append(g)
            return True

        at = {g: len(taken.get(g, ())) for g in queues}
        met = _greedy(trace, scores, queues, cm, kind, target, take_logged, start=at, exclude={gid})
        entry = (gid, block, journal)
        if not met:
            undo(entry)
            return None
        return entry

    def undo(entry) -> None:
        gid, block, journal = entry
        for g in reversed(journal):
            b = taken[g].pop()
            cm.restore(trace.groups[g].units[b])
            del removed[g][len(removed[g]) - len(b):]
        take(gid, block)

    return _exchange_rounds(lambda: sorted(g for g, bs in taken.items() if bs), attempt, undo,
                            lambda: _fill_key(cm.totals[kind], scores, removed, target))


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


def _snap(trace, scores, removed: dict[int, list[int]], cm: CostModel, budget: Budget, kind: str | None,
          target: float | None, table=None, blocks: dict | None = None, fill: bool = False) -> tuple[list[dict], dict]:
    """``--round-to auto``: snap every pruned group's kept width to the fastest width not above the
    planned one, read from the measured latency staircase of the layers the group feeds and is fed
    by (a few candidate widths per layer axis, see graphprune.latency), then spend what snapping
    saved: put back the most valuable removed units of any group, a whole step of its staircase at a
    time, while the budget (``target`` of ``kind``) still holds. Edits ``removed`` and ``cm``."""
    import time

    from .latency import LatencyTable, candidate_widths, frontier, layer_spec, snap_width

    t0 = time.perf_counter()
    blocks = blocks or {}
    own = table is None
    if own:
        table = LatencyTable(**(budget.hardware or {}), shapes=trace.input_shapes)
    measured0, seconds0 = table.measured, table.seconds
    # every timed layer axis: (spec, axis, its id array, the other axis' id array or None)
    axes: dict[int, list[tuple[dict, str, int | None]]] = {}
    for layer in trace.state.layers:
        spec = layer_spec(trace, layer)
        if spec is None:
            continue
        arrs = [None if ids is None else cm._array(ids) for ids in (layer.out_ids, layer.in_ids)]
        for k, axis in enumerate(("out", "in")):
            if arrs[k] is not None:
                axes.setdefault(arrs[k], []).append((spec, axis, arrs[1 - k]))

    orders, states = {}, {}
    for gid in sorted(removed):
        g = trace.groups[gid]
        if not removed[gid]:
            continue
        touched: dict[int, float] = {}
        for r in g.units:
            for a, c in cm.unit_arrays.get(int(r), ()):
                touched[a] = touched.get(a, 0.0) + c
        touched = {a: c / g.size for a, c in touched.items() if a in axes}  # channels per unit, per array
        if not touched:
            continue
        cpu = g.channels_per_unit
        lowest = g.size - _max_remove(g, budget, blocks)
        kept = g.size - len(removed[gid])
        unit = cpu * blocks.get(gid, (1, 0))[0]  # whole NCHWc blocks where channel_blocks says so
        cands = [w // cpu for w in candidate_widths(kept * cpu, g.size * cpu, unit, lowest * cpu)]
        ms = {c: 0.0 for c in cands}
        for a, per_unit in touched.items():
            widths = {c: int(round(cm.count[a] + (c - kept) * per_unit)) for c in cands}
            for spec, axis, other in axes[a]:
                weight = 1.0 if other is None else cm.count[other] / max(len(cm.arrays[other]), 1)
                got = table.axis_times(spec, axis, widths.values())
                for c in cands:
                    ms[c] += weight * got.get(widths[c], float("nan"))
        ms = {c: v for c, v in ms.items() if v == v}
        if len(ms) < 2:
            continue
        order = np.argsort(np.asarray(scores[gid], dtype=np.float64), kind="stable")
        orders[gid] = order
        target_units = snap_width(kept, ms, lowest)
        if target_units < kept:
            block = order[len(removed[gid]):len(removed[gid]) + kept - target_units]
            roots = g.units[block]
            if cm.allowed(roots):
                cm.remove(roots)
                removed[gid].extend(block.tolist())
        states[gid] = {"group": gid, "planned": kept * cpu, "snapped": (g.size - len(removed[gid])) * cpu,
                       "frontier": [c * cpu for c in frontier(ms)], "candidates_ms": {str(c * cpu): round(float(v), 4)
                                                                                      for c, v in sorted(ms.items())}}
        states[gid]["lowest"] = lowest * cpu
    if kind is not None and target is not None:
        _lift_stuck(trace, scores, removed, cm, states, orders, kind, target)
    # spend what snapping saved: whole staircase steps of the most valuable removed units
    refills = 0
    while kind is not None and target is not None:
        best, best_p = None, -math.inf
        for gid, st in states.items():
            g = trace.groups[gid]
            cpu = g.channels_per_unit
            kept = g.size - len(removed[gid])
            ups = [f // cpu for f in st["frontier"] if f // cpu > kept]
            if not ups:
                continue
            n_rem, add = len(removed[gid]), min(ups) - kept
            if add > n_rem:
                continue
            block = np.asarray(removed[gid][n_rem - add:], dtype=np.int64)
            extra = cm.delta(g.units[block], kind, sign=+1)
            if cm.totals[kind] + extra > target * (1 + 1e-9):
                continue
            p = math.inf if extra <= 0 else float(np.sum(np.asarray(scores[gid])[block])) / extra
            if p > best_p:
                best, best_p = (gid, block), p
        if best is None:
            break
        gid, block = best
        cm.restore(trace.groups[gid].units[block])
        del removed[gid][len(removed[gid]) - len(block):]
        refills += 1
    exchanges = 0
    if fill and kind == "latency" and target is not None:
        exchanges = _exchange_steps(trace, scores, removed, cm, states, orders, kind, target)
    out = []
    for gid, st in states.items():
        g = trace.groups[gid]
        st["final"] = (g.size - len(removed[gid])) * g.channels_per_unit
        st.pop("lowest", None)
        out.append(st)
    if own:
        table.save()
    info = {"provider": table.provider, "device": table.device, "batch": table.batch, "threads": table.threads,
            "precision": table.precision, "cache": str(table.cache_path),
            "layer_axes_measured": table.measured - measured0, "measure_seconds": round(table.seconds - seconds0, 3),
            "seconds": round(time.perf_counter() - t0, 3), "refill_steps": refills, "exchange_steps": exchanges,
            "channel_block": getattr(table, "channel_block", 1),
            "groups_in_blocks": sum(1 for st, _ in blocks.values() if st > 1), "groups_floored": len(blocks)}
    return out, info


def _step_down(trace, scores, removed, cm: CostModel, states: dict, orders: dict, kind: str, target: float,
               skip: int) -> list | None:
    """Take whole steps down other groups' frontiers (lowest score per cost saved first, never group
    ``skip``) until ``kind`` is at most ``target``. Returns the journal of steps taken ((group,
    units, -1) each), or None when the target cannot be met so (the steps already taken stay: the
    caller undoes them with ``_undo``)."""
    journal = []
    while cm.totals[kind] > target * (1 + 1e-9):
        best, best_p = None, math.inf
        for other, ost in states.items():
            if other == skip:
                continue
            og = trace.groups[other]
            ocpu = og.channels_per_unit
            kept = og.size - len(removed[other])
            downs = [f // ocpu for f in ost["frontier"] if ost["lowest"] <= f < kept * ocpu]
            if not downs:
                continue
            n = len(removed[other])
            step = orders[other][n:n + kept - max(downs)]
            roots = og.units[step]
            saving = -cm.delta(roots, kind)
            if saving <= 0 or not cm.allowed(roots):
                continue
            p = float(np.sum(np.asarray(scores[other])[step])) / saving
            if p < best_p:
                best, best_p = (other, step), p
        if best is None:
            _undo(trace, removed, cm, journal)
            return None
        other, step = best
        cm.remove(trace.groups[other].units[step])
        removed[other].extend(step.tolist())
        journal.append((other, step, -1))
    return journal


def _undo(trace, removed, cm: CostModel, journal: list) -> None:
    """Undo (group, units, sign) steps, last first: +1 was a step up (units put back), -1 down."""
    for jg, jb, sign in reversed(journal):
        roots = trace.groups[jg].units[jb]
        if sign > 0:
            cm.remove(roots)
            removed[jg].extend(jb.tolist())
        else:
            cm.restore(roots)
            del removed[jg][len(removed[jg]) - len(jb):]
    journal.clear()


def _step_up(trace, removed, cm: CostModel, states: dict, gid: int):
    """Put group gid back up to its next frontier width; (group, units, +1) or None at the top."""
    g = trace.groups[gid]
    cpu = g.channels_per_unit
    kept = g.size - len(removed[gid])
    ups = [f // cpu for f in states[gid]["frontier"] if f // cpu > kept]
    n_rem = len(removed[gid])
    if not ups or min(ups) - kept > n_rem:
        return None
    block = np.asarray(removed[gid][n_rem - (min(ups) - kept):], dtype=np.int64)
    cm.restore(g.units[block])
    del removed[gid][n_rem - len(block):]
    return gid, block, +1


def _exchange_steps(trace, scores, removed, cm: CostModel, states: dict, orders: dict, kind: str,
                    target: float) -> int:
    """``_exchange`` on snapped widths (fill=True, round_to "auto"): snapping to the measured
    staircases and the refill's whole steps can leave a plan far under its target with nothing that
    fits back (the sample zoo's SiLU-net in free widths: layer budgets 0.538 and 0.540 gave plans at
    0.42 and 0.49 of the layers' time). One group a step up its frontier, others steps down until
    the target holds; kept by the same rule as ``_exchange`` (within FILL_BAND under the target,
    the lower removed score; else the closer), while one improves. Returns the exchanges kept."""
    def attempt(gid: int):
        up = _step_up(trace, removed, cm, states, gid)
        if up is None:
            return None
        down = _step_down(trace, scores, removed, cm, states, orders, kind, target, gid)
        if down is None:
            _undo(trace, removed, cm, [up])
            return None
        return [up, *down]

    return _exchange_rounds(lambda: sorted(states), attempt, lambda journal: _undo(trace, removed, cm, journal),
                            lambda: _fill_key(cm.totals[kind], scores, removed, target))


def _lift_stuck(trace, scores, removed, cm: CostModel, states: dict, orders: dict, kind: str, target: float) -> None:
    """A group whose planned width is off its staircase's frontier but cannot go down (the per-group
    cap) is lifted to the next frontier width (the same time, more channels); what that costs of the
    budget is taken from other groups, a whole step down their frontier at a time (lowest score per
    cost first). If the budget cannot be restored so, the lift is undone."""
    def kept(gid):
        return trace.groups[gid].size - len(removed[gid])

    for gid, st in states.items():
        g = trace.groups[gid]
        cpu = g.channels_per_unit
        if kept(gid) * cpu in st["frontier"] or st["snapped"] != st["planned"]:
            continue
        up = _step_up(trace, removed, cm, states, gid)
        if up is not None and _step_down(trace, scores, removed, cm, states, orders, kind, target, gid) is None:
            _undo(trace, removed, cm, [up])  # cannot pay for the lift
