"""Stage: verify. Numerical parity of a pruned model against the masked original (per round), the
structural check a report allows after weights were updated, and the standalone ``verify`` of an
(original, pruned, report) triple."""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import UserError, VerificationError
from ..io import load_model
from ..memory import trim
from ..parity import compare
from ..rewriter import expanded_pruned, masked_view, sliced_mismatches
from ..tracer import Trace
from .load import check_sizes, load_and_trace, signature


def verify_round(tr: Trace, removed_roots, model, pruned, *, seed: int, rtol: float, timings: dict,
                 tag: str = "") -> dict:
    """PRUNED must compute what the original (carrying any compensated weights) computes with the
    removed channels masked, at the trace's input size and a second one when sizes are dynamic."""
    t = time.perf_counter()
    result = compare(lambda: masked_view(tr, removed_roots, model), pruned, seed=seed, rtol=rtol,
                     **check_sizes(model, tr))
    trim()
    timings[tag + "verify"] = time.perf_counter() - t
    if not result["ok"]:
        raise VerificationError(f"pruned model differs from the masked original "
                                f"(max rel error {result.get('max_rel_error', float('nan')):.3g}); nothing written")
    return result


def verify_structure(tr0: Trace, removed: dict, model, pruned, *, seed: int, rtol: float, timings: dict) -> dict:
    """After compensation, recovery or several rounds: the original graph carrying PRUNED's weights
    in the kept positions (zeros elsewhere) must compute what PRUNED computes; this is what lets
    ``graphprune verify`` check ORIGINAL vs OUT from the report alone."""
    t = time.perf_counter()
    check = compare(expanded_pruned(tr0, tr0.removed_roots(removed), pruned, model), pruned,
                    seed=seed, rtol=rtol, **check_sizes(model, tr0))
    timings["verify_expanded"] = time.perf_counter() - t
    if not check["ok"]:
        raise VerificationError(f"pruned model does not match the original's channel structure "
                                f"(max rel error {check.get('max_rel_error', float('nan')):.3g}); nothing written")
    return check


def _removed_from_report(tr: Trace, report: dict) -> dict[int, np.ndarray]:
    groups = report.get("groups")
    if not isinstance(groups, list) or len(groups) != len(tr.groups):
        raise UserError("report does not describe this original model (group count differs)")
    removed: dict[int, np.ndarray] = {}
    for g, entry in zip(tr.groups, groups):
        names = [s.node for s in g.sources]
        if [s.get("node") for s in entry.get("sources", [])] != names:
            raise UserError(f"report does not describe this original model (group {g.id} sources differ)")
        rem = np.asarray(entry.get("removed", []), dtype=np.int64)
        if len(rem) and (rem.min() < 0 or rem.max() >= g.size):
            raise UserError(f"report group {g.id}: removed index out of range")
        if len(rem):
            removed[g.id] = rem
    return removed


def verify(original: str | os.PathLike, pruned_path: str | os.PathLike, report: dict, *, rtol: float = 1e-4,
           seed: int = 0, input_shapes=None) -> dict:
    """Rebuild the masked original from ORIGINAL and the report, compare it with PRUNED (at
    ``input_shapes``, else the size the report records, else the model's static dims)."""
    recorded = report.get("input_shapes") if isinstance(report.get("input_shapes"), dict) else None
    model, tr = load_and_trace(original, input_shapes, hint=recorded)
    pruned = load_model(pruned_path)
    if report.get("criterion") == "eigendamage":
        from .eigendamage import verify_eigendamage

        return verify_eigendamage(model, tr, pruned, report, rtol=rtol, seed=seed)
    sizes = check_sizes(model, tr)
    removed = _removed_from_report(tr, report)
    if signature(pruned) != signature(model):
        return {"ok": False, "reason": "input/output signature differs from the original"}
    roots = tr.removed_roots(removed)
    if (report.get("compensation") or report.get("recovery") or report.get("compensated_tensors")
            or (report.get("budget") or {}).get("steps", 1) > 1):
        # kept weights were updated: tensors compensation did not touch must be exact slices of the
        # original, and the original graph carrying the pruned weights must compute the same function
        skip = report.get("compensated_tensors", [])
        if not isinstance(skip, list):
            raise UserError("report: 'compensated_tensors' must be a list")
        bad = sliced_mismatches(tr, roots, pruned, skip=set(skip))
        if bad:
            return {"ok": False, "reason": f"{len(bad)} initializers are not the original's slice for the "
                                          f"reported removal (e.g. {bad[0]!r})"}
        res = compare(expanded_pruned(tr, roots, pruned, model), pruned, seed=seed, rtol=rtol, **sizes)
        if report.get("recovery"):
            # recovery retrained the producers' rows too: which channels of a group were kept is then a
            # labelling no weight value pins down (relabelling kept channels consistently computes the
            # same function); what is checked is the structure and the function
            res["note"] = ("weights retrained by recovery: checked the channel structure (counts per group and "
                           "where every tensor is cut) and the function, not which channels of a group were kept")
        return res
    return compare(lambda: masked_view(tr, roots, model), pruned, seed=seed, rtol=rtol, **sizes)
