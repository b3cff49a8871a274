"""Trace an ONNX graph into groups of coupled channels."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import log
from .io import opset_of
from .rules import REGISTRY, SOURCE_OPS, Member, Source, TraceState

_DEFAULT_DOMAINS = (None, "", "ai.onnx")


@dataclass
class Group:
    """Channels that must be removed together. ``units[i]`` is the root id of the i-th removable
    unit (one channel, or one channel per conv group for grouped convolutions)."""

    id: int
    units: np.ndarray
    sources: list[Source]
    frozen: list[str] = field(default_factory=list)
    channels_per_unit: int = 1

    @property
    def prunable(self) -> bool:
        return not self.frozen and len(self.units) > 1

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class Trace:
    graph: gs.Graph
    state: TraceState
    roots: np.ndarray
    groups: list[Group]
    position: dict[int, tuple[int, int]]  # root -> (group id, index in group)
    opset: int

    @property
    def members(self) -> list[Member]:
        return self.state.members

    def unit_index(self, ids: np.ndarray, group: Group) -> np.ndarray:
        """For an id array: the index of each entry's unit within ``group`` (-1 if elsewhere)."""
        out = np.full(len(ids), -1, dtype=np.int64)
        for k, r in enumerate(self.roots[np.asarray(ids)].tolist()):
            pos = self.position.get(r)
            if pos is not None and pos[0] == group.id:
                out[k] = pos[1]
        return out

    def kept_fn(self, removed_roots):
        keep = np.ones(len(self.roots), dtype=bool)
        removed = np.asarray(sorted(removed_roots), dtype=np.int64)
        if len(removed):
            keep[removed] = False
        return lambda ids: keep[self.roots[np.asarray(ids, dtype=np.int64)]]

    def removed_roots(self, plan: dict[int, np.ndarray]) -> set[int]:
        out: set[int] = set()
        for gid, positions in plan.items():
            out.update(int(r) for r in self.groups[gid].units[np.asarray(positions, dtype=np.int64)])
        return out


def _quiet_backends() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def to_graph(model: onnx.ModelProto, *, fold: bool = True) -> gs.Graph:
    """Import into onnx-graphsurgeon; fold constant subgraphs; give every node a unique name."""
    _quiet_backends()
    graph = gs.import_onnx(model)
    if fold:
        try:
            graph.fold_constants(error_ok=True, flatten_subgraphs=False).cleanup()
        except Exception as exc:  # folding is an optimisation only
            log.warn(f"constant folding skipped ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}__gp"
        seen.add(node.name)
    graph.toposort()
    return graph


def _implicit_inputs(node) -> set[str]:
    names: set[str] = set()
    for sub in node.subgraphs():
        local = {t.name for t in sub.inputs}
        for n in sub.nodes:
            local.update(t.name for t in n.outputs)
        for n in sub.nodes:
            names.update(t.name for t in n.inputs if t is not None and t.name not in local)
            names.update(_implicit_inputs(n))
    return names


def trace(graph: gs.Graph, opset: int) -> Trace:
    st = TraceState()
    st.opset = opset
    for node in graph.nodes:
        rule = REGISTRY.get(node.op) if node.domain in _DEFAULT_DOMAINS else None
        has_info = any(st.info(t) is not None for t in node.inputs)
        if list(node.subgraphs()):
            reason = f"control flow ({node.op})"
            st.freeze_inputs(node, reason)
            for name in _implicit_inputs(node):
                if name in st.infos:
                    st.freeze(st.infos[name].ids, reason)
            continue
        if rule is None:
            if has_info:
                where = node.op if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op}"
                st.freeze_inputs(node, f"no channel rule for {where}")
            continue
        if not has_info and node.op not in SOURCE_OPS:
            continue
        rule.trace(node, st)
    for out in graph.outputs:
        info = st.info(out)
        if info is not None:
            st.freeze(info.ids, f"reaches graph output {out.name!r}")
    return _build(graph, st, opset)


def _build(graph: gs.Graph, st: TraceState, opset: int) -> Trace:
    roots = st.uf.roots()
    frozen: dict[int, list[str]] = {}
    for ids, reason in st.frozen:
        for r in np.unique(roots[ids]).tolist():
            frozen.setdefault(r, [])
            if reason not in frozen[r]:
                frozen[r].append(reason)
    # sources sharing a unit (residual sums, concat-then-add, ...) form one group
    parent = list(range(len(st.sources)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for si, src in enumerate(st.sources):
        for r in np.unique(roots[src.ids]).tolist():
            if r in owner:
                a, b = find(owner[r]), find(si)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[r] = si
    by_comp: dict[int, list[int]] = {}
    for si in range(len(st.sources)):
        by_comp.setdefault(find(si), []).append(si)
    groups: list[Group] = []
    position: dict[int, tuple[int, int]] = {}
    for comp in sorted(by_comp.values(), key=lambda c: c[0]):
        gid = len(groups)
        units: list[int] = []
        for si in comp:
            for r in roots[st.sources[si].ids].tolist():
                if r not in position:
                    position[r] = (gid, len(units))
                    units.append(r)
        reasons: list[str] = []
        for r in units:
            for reason in frozen.get(r, []):
                if reason not in reasons:
                    reasons.append(reason)
        first = st.sources[comp[0]].ids
        per_unit = max(1, len(first) // max(1, len(np.unique(roots[first]))))
        groups.append(Group(gid, np.asarray(units, dtype=np.int64), [st.sources[si] for si in comp], reasons,
                            per_unit))
    return Trace(graph, st, roots, groups, position, opset)


def trace_model(model: onnx.ModelProto) -> Trace:
    return trace(to_graph(model), opset_of(model))
