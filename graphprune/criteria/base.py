"""The scoring interface: criteria see groups, parameter slices and (later) activations, never op types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..rules import Member
from ..tracer import Group, Trace


@dataclass
class Slice:
    """One member slice seen from a group: ``values`` is the whole constant, ``unit[i]`` the
    group-local unit index of position i along ``member.axis`` (-1: another group's channel)."""

    member: Member
    values: np.ndarray
    unit: np.ndarray

    def per_index(self, fn, chunk: int = 1 << 22) -> np.ndarray:
        """Apply ``fn`` (a row-wise reduction of a 2-D float64 array) to each slice along the member
        axis, reduced over the other axes; rows go through in blocks of about ``chunk`` values so
        the float64 temporaries stay small however large the weight is."""
        moved = np.moveaxis(self.values, self.member.axis, 0)
        n = moved.shape[0]
        step = max(1, chunk // max(1, int(np.prod(moved.shape[1:], dtype=np.int64))))
        parts = [fn(moved[i:i + step].reshape(len(moved[i:i + step]), -1).astype(np.float64))
                 for i in range(0, n, step)]
        return np.concatenate(parts) if parts else np.zeros(0)


class ScoringContext:
    """What a criterion may read. Statistics that need data (activations, gradients, curvature)
    are added by the data-driven criteria; weights-only criteria need nothing else."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.stats = None  # curvature.collect.Stats, for criteria that need data
        self.views = {}  # node name -> curvature.layers.LayerView
        self._slices: dict[int, list[Slice]] = {}
        tensors = trace.graph.tensors()
        for m in trace.members:
            gids, pos = trace.locate(m.ids)
            values = trace.state.const(tensors[m.tensor])
            for gid in np.unique(gids[gids >= 0]).tolist():
                self._slices.setdefault(gid, []).append(Slice(m, values, np.where(gids == gid, pos, -1)))

    def slices(self, group: Group, roles=("out", "in", "param", "bias")) -> list[Slice]:
        return [s for s in self._slices.get(group.id, []) if s.member.role in roles]

    def layer_units(self, group: Group):
        """For each layer with curvature statistics touching the group: (view, row units, column
        units), unit arrays index the view's canonical rows / columns (-1: not this group)."""
        per_node: dict[str, dict[str, np.ndarray]] = {}
        for sl in self.slices(group, roles=("out", "in")):
            view = self.views.get(sl.member.node)
            if view is None or sl.member.input_index != 1:
                continue
            entry = per_node.setdefault(view.node, {})
            if sl.member.role == "out":
                entry["rows"] = sl.unit
            else:
                entry["cols"] = np.repeat(sl.unit, view.taps)
        return [(self.views[n], e.get("rows"), e.get("cols")) for n, e in per_node.items()]


class Criterion:
    """A criterion maps every prunable group to one score per unit: an estimate of the loss
    increase from removing that unit (lower = remove first)."""

    name: ClassVar[str] = ""
    #: what a run must compute for this criterion: "weights", "activations", "gradients", ...
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})
    #: scores are loss estimates from data (weight compensation is on by default for these)
    curvature: ClassVar[bool] = False

    def score(self, ctx: ScoringContext) -> dict[int, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def on_batch(self, ctx: ScoringContext, tg) -> None:
        """Called after every calibration mini-batch's backward pass (criteria needing "grads")."""


def accumulate(group: Group, sl: Slice, per_index: np.ndarray, out: np.ndarray) -> None:
    """Add per-index values of a slice onto the group's unit scores."""
    sel = sl.unit >= 0
    np.add.at(out, sl.unit[sel], per_index[sel])
