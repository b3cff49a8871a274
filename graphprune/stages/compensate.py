"""Stage: compensate. Weight compensation for a removal, written into the trace graph (which holds
the original's only copy of the weights), with what it replaced so a caller can undo it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..tracer import Trace
from .score import Scoring


@dataclass
class Compensation:
    tensors: list[str] = field(default_factory=list)  # the names written (into the pruned model too)
    originals: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name → the value it replaced

    def undo(self, tr: Trace) -> None:
        """Put the replaced values back into the trace graph (the pruned model keeps the new ones)."""
        tensors = tr.graph.tensors()
        for name, values in self.originals.items():
            tensors[name].values = values
        self.originals = {}


def compensate(tr: Trace, scoring: Scoring, removed_roots, damping: float, timings: dict,
               tag: str = "") -> Compensation:
    """Update the kept weights for ``removed_roots`` with ``scoring.method`` (nothing without one)."""
    done = Compensation()
    if not scoring.method or not removed_roots:
        return done
    from ..curvature.compensate import compensate as updates

    t = time.perf_counter()
    tensors = tr.graph.tensors()
    for name, values in updates(scoring.ctx, tr.kept_fn(removed_roots), scoring.method, damping).items():
        done.originals[name] = tensors[name].values
        done.tensors.append(name)
        tensors[name].values = values
    timings[tag + "compensate"] = time.perf_counter() - t
    return done
