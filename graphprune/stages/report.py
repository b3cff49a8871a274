"""Stage: report. The group table (what was traced, what was removed) and the report's common head."""
from __future__ import annotations

import numpy as np

from .. import __version__
from ..shapes import describe as describe_shapes
from ..tracer import Trace
from .load import upgrade_info


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


def head(path, out, criterion: str, compensation, model, tr: Trace) -> dict:
    """The entries every prune report starts with."""
    return {"graphprune": __version__, "input": str(path), "output": str(out), "criterion": criterion,
            "compensation": compensation, "input_shapes": describe_shapes(tr.input_shapes), **upgrade_info(model)}


def totals(before: dict, after: dict, channels_removed: int) -> dict:
    return {"macs_before": before["macs"], "macs_after": after["macs"],
            "params_before": before["params"], "params_after": after["params"],
            "macs_ratio": after["macs"] / max(before["macs"], 1.0),
            "params_ratio": after["params"] / max(before["params"], 1.0), "channels_removed": channels_removed}
