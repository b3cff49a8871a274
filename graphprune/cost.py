"""MACs and parameter counts as functions of which units are kept.

Every cost is a sum of terms ``coef × Π kept(array)`` where an array is the id array of one
channel axis (a layer's output or input channels, one axis of an initializer). Removing a unit
decrements the kept count of the arrays it appears in, so the planner updates costs locally.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .tracer import Trace


@dataclass
class Term:
    """coef × Π kept(array), or fn(*kept counts) when a measured table gives the cost."""

    coef: float
    arrays: tuple[int, ...]
    fn: object = None

    def value(self, counts) -> float:
        return float(self.fn(*counts)) if self.fn is not None else self.coef * float(np.prod(counts))


class CostModel:
    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._index: dict[bytes, int] = {}
        self.arrays: list[np.ndarray] = []
        self.macs_terms: list[Term] = []
        self.params_terms: list[Term] = []
        for layer in trace.state.layers:
            arrays, coef = [], layer.coef
            for ids, size in ((layer.out_ids, layer.out_size), (layer.in_ids, layer.in_size)):
                if ids is None:
                    coef *= size
                else:
                    arrays.append(self._array(ids))
            self.macs_terms.append(Term(coef, tuple(arrays)))
        self._param_terms()
        # tensors that must keep at least one channel
        self.tensor_arrays = sorted({self._array(info.ids) for info in trace.state.infos.values()})
        self.count = np.array([len(a) for a in self.arrays], dtype=np.float64)
        self.unit_arrays: dict[int, list[tuple[int, int]]] = {}
        for a, roots in enumerate(self.arrays):
            uniq, cnt = np.unique(roots, return_counts=True)
            for r, c in zip(uniq.tolist(), cnt.tolist()):
                self.unit_arrays.setdefault(r, []).append((a, c))
        self.array_terms: dict[int, list[tuple[str, int]]] = {}
        for kind, terms in (("macs", self.macs_terms), ("params", self.params_terms)):
            for ti, t in enumerate(terms):
                for a in t.arrays:
                    self.array_terms.setdefault(a, []).append((kind, ti))
        self._is_tensor = np.zeros(len(self.arrays), dtype=bool)
        self._is_tensor[self.tensor_arrays] = True
        self.latency_terms: list[Term] = []
        self.totals = {"macs": self._total(self.macs_terms, self.count),
                       "params": self._total(self.params_terms, self.count)}
        self.full = dict(self.totals)

    def add_latency(self, table) -> int:
        """Per-layer latency terms (ms) from a graphprune.latency.LatencyTable; returns how many
        layers have a table (others are fixed cost the end-to-end measurement accounts for). A
        MatMul of two activations (attention) is timed at full size and scales with its kept units."""
        from .latency import interpolator, layer_spec, pair_spec

        for layer in self.trace.state.layers:
            spec = layer_spec(self.trace, layer)
            if spec is None:
                pair = pair_spec(self.trace, layer)
                if pair is None:
                    continue
                f = _linear(table.pair_ms(pair), layer.out_size, layer.in_size)
            else:
                f = interpolator(*table.grid(spec))
            arrays, slots = [], []
            for ids, size in ((layer.out_ids, layer.out_size), (layer.in_ids, layer.in_size)):
                slots.append(None if ids is None else len(arrays))
                if ids is not None:
                    arrays.append(self._array(ids))
            sizes = (layer.out_size, layer.in_size)

            def fn(*counts, slots=tuple(slots), sizes=sizes, f=f):
                o, i = (sizes[k] if slots[k] is None else counts[slots[k]] for k in range(2))
                return f(o, i)

            self.latency_terms.append(Term(0.0, tuple(arrays), fn))
        for ti, t in enumerate(self.latency_terms):
            for a in t.arrays:
                self.array_terms.setdefault(a, []).append(("latency", ti))
        self.totals["latency"] = self._total(self.latency_terms, self.count)
        self.full["latency"] = self._total(self.latency_terms, np.array([len(a) for a in self.arrays], float))
        return len(self.latency_terms)

    def _array(self, ids) -> int:
        roots = self.trace.roots[np.asarray(ids, dtype=np.int64)]
        key = roots.tobytes()
        if key not in self._index:
            self._index[key] = len(self.arrays)
            self.arrays.append(roots)
        return self._index[key]

    def _param_terms(self) -> None:
        axes: dict[str, dict[int, np.ndarray]] = {}
        for m in self.trace.members:
            axes.setdefault(m.tensor, {}).setdefault(m.axis, m.ids)
        for t in self.trace.graph.tensors().values():
            if not isinstance(t, gs.Constant) or not np.issubdtype(np.dtype(t.dtype), np.floating):
                continue
            shape = list(t.shape)
            arrays, coef = [], 1.0
            for ax, d in enumerate(shape):
                ids = axes.get(t.name, {}).get(ax)
                if ids is not None and len(ids) == d:
                    arrays.append(self._array(ids))
                else:
                    coef *= d
            self.params_terms.append(Term(coef, tuple(arrays)))

    @staticmethod
    def _total(terms: list[Term], count: np.ndarray) -> float:
        return float(sum(t.value([count[a] for a in t.arrays]) for t in terms))

    def _terms(self, kind: str) -> list[Term]:
        return {"macs": self.macs_terms, "params": self.params_terms, "latency": self.latency_terms}[kind]

    def delta(self, roots, kind: str, sign: int = -1) -> float:
        """Cost change (negative = saving) if ``roots`` were removed now (``sign`` +1: put back)."""
        changed: dict[int, float] = {}
        for r in roots:
            for a, c in self.unit_arrays.get(int(r), ()):
                changed[a] = changed.get(a, self.count[a]) + sign * c
        terms = {ti for a in changed for k, ti in self.array_terms.get(a, ()) if k == kind}
        tl = self._terms(kind)
        d = 0.0
        for ti in terms:
            t = tl[ti]
            d += t.value([changed.get(a, self.count[a]) for a in t.arrays]) - t.value([self.count[a] for a in t.arrays])
        return float(d)

    def allowed(self, roots) -> bool:
        """Would every tensor keep at least one channel?"""
        changed: dict[int, float] = {}
        for r in roots:
            for a, c in self.unit_arrays.get(int(r), ()):
                changed[a] = changed.get(a, self.count[a]) - c
        return all(v >= 1 or not self._is_tensor[a] for a, v in changed.items())

    def remove(self, roots, sign: int = -1) -> None:
        for kind in self.totals:
            self.totals[kind] += self.delta(roots, kind, sign)
        for r in roots:
            for a, c in self.unit_arrays.get(int(r), ()):
                self.count[a] += sign * c

    def restore(self, roots) -> None:
        """Put back units removed earlier."""
        self.remove(roots, sign=+1)


def _linear(ms: float, out_size: int, in_size: int):
    """ms at full width, scaled by the kept fraction of each axis."""
    def f(o: float, i: float = 1.0) -> float:
        return ms * (o / max(out_size, 1)) * (i / max(in_size, 1))

    return f


def model_costs(trace: Trace) -> dict[str, float]:
    """MACs (batch 1) and float parameter count of a traced model."""
    cm = CostModel(trace)
    return {"macs": cm.full["macs"], "params": cm.full["params"]}
