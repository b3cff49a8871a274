"""Criteria registry. Curvature criteria (taylor, taylor2, fisher, kron-obd/obs, woodfisher,
woodtaylor, eigendamage) plug in here with the same interface."""
from __future__ import annotations

from .base import Criterion, ScoringContext, Slice
from .curvature import CURVATURE
from .magnitude import Lossless, Magnitude

CRITERIA: dict[str, type[Criterion] | object] = {
    "magnitude": lambda: Magnitude(2),
    "magnitude-l1": lambda: Magnitude(1),
    "lossless": Lossless,
    **CURVATURE,
}



def make_criterion(name: str) -> Criterion:
    from ..errors import UserError

    if name == "eigendamage":
        raise UserError("eigendamage rewrites layers instead of removing channels: run it through prune()")
    if name == "eigendamage-channel":  # lives with EigenDamage, which imports this package
        from ..eigendamage import EigenDamageChannel

        return EigenDamageChannel()
    if name not in CRITERIA:
        raise UserError(f"unknown criterion {name!r} (available: {', '.join(sorted([*CRITERIA, 'eigendamage', 'eigendamage-channel']))})")
    return CRITERIA[name]()


__all__ = ["CRITERIA", "Criterion", "Lossless", "Magnitude", "ScoringContext", "Slice", "make_criterion"]
