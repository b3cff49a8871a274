"""Numerical parity between a pruned model and its masked original."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Union

import numpy as np
import onnx

from .runtime import GraphModel, random_inputs, run, session

#: a model, or a zero-argument callable opening one (e.g. ``lambda: masked_view(...)``) that
#: compare() enters only after the candidate has run, so the two never hold memory at once
Reference = Union[onnx.ModelProto, GraphModel, Callable[[], ContextManager]]


def _outputs(model, feeds_list: list[dict], optional: int = 0) -> tuple[list[str], list]:
    """Outputs of ``model`` on each feed; the last ``optional`` feeds may fail (None then)."""
    from .errors import UserError

    sess = session(model, prepack=False)  # no pre-packed second copy of the weights for a few runs
    names = [o.name for o in sess.get_outputs()]
    results = []
    for k, feeds in enumerate(feeds_list):
        try:
            results.append(run(sess, feeds))
        except UserError as exc:
            if k < len(feeds_list) - optional:
                raise
            results.append(exc)
    del sess
    return names, results


def compare(reference: Reference, candidate: onnx.ModelProto | GraphModel, *, batches=(1, 3), seed: int = 0,
            rtol: float = 1e-4, shapes=None, second=None) -> dict:
    """Run both models on random inputs; relative error = max|a-b| / max(max|a|, 1e-6) per output
    (relative to the output's magnitude, not element by element).

    ``shapes`` ({input: dims}, graphprune.shapes.resolve) is the size the batches run at; ``second``
    an optional second size (models with dynamic height/width/length: it catches a size baked in
    by the rewrite), run at batch 2. When the reference itself cannot run at ``second``, that size
    is skipped and the result says so. The candidate runs first and its session is gone before the
    reference is opened and run."""
    feeds_list = [random_inputs(candidate, batch=batch, seed=seed + k, shapes=shapes) for k, batch in enumerate(batches)]
    if second is not None:
        feeds_list.append(random_inputs(candidate, batch=2, seed=seed + len(batches), shapes=second))
    optional = int(second is not None)
    cand_names, cand_results = _outputs(candidate, feeds_list, optional)
    opened = reference() if callable(reference) else contextlib.nullcontext(reference)
    with opened as ref:
        ref_names, ref_results = _outputs(ref, feeds_list, optional)
    sizes = [_size_of(f) for f in feeds_list]
    info = {"rtol": rtol, "batches": list(batches), "sizes": sizes}
    if second is not None:
        if isinstance(ref_results[-1], Exception):  # the original does not accept that size either
            info["second_size_skipped"] = f"the original cannot run at {sizes[-1]} ({ref_results[-1]})"
            ref_results, cand_results, info["sizes"] = ref_results[:-1], cand_results[:-1], sizes[:-1]
        elif isinstance(cand_results[-1], Exception):
            return {"ok": False, "reason": f"the pruned model cannot run at {sizes[-1]}, where the original can "
                                           f"({cand_results[-1]})", **info,
                    "max_abs_error": float("inf"), "max_rel_error": float("inf")}
    if ref_names != cand_names:
        return {"ok": False, "reason": f"outputs differ: {ref_names} vs {cand_names}"}
    worst_abs, worst_rel = 0.0, 0.0
    for ref_out, cand_out in zip(ref_results, cand_results):
        for a, b in zip(ref_out, cand_out):
            if a.shape != b.shape:
                return {"ok": False, "reason": f"output shape {b.shape} != {a.shape}", **info}
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            fa, fb = np.isfinite(a64), np.isfinite(b64)
            # NaN/Inf (e.g. from NaN weights) must sit at the same places with the same value; a NaN
            # must never make the comparison vacuous (max() ignores NaN)
            if not np.array_equal(fa, fb) or not np.array_equal(a64[~fa], b64[~fb], equal_nan=True):
                return {"ok": False, "reason": "non-finite outputs differ", "max_abs_error": float("inf"),
                        "max_rel_error": float("inf"), **info}
            diff = float(np.max(np.abs(a64[fa] - b64[fa]))) if fa.any() else 0.0
            scale = max(float(np.max(np.abs(a64[fa]))) if fa.any() else 0.0, 1e-6)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    return {"ok": bool(worst_rel <= rtol), "max_abs_error": worst_abs, "max_rel_error": worst_rel, **info}


def _size_of(feeds: dict) -> dict:
    return {k: list(v.shape) for k, v in feeds.items()}
