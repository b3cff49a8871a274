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


def _outputs(model, feeds_list: list[dict]) -> tuple[list[str], list[list[np.ndarray]]]:
    sess = session(model, prepack=False)  # no pre-packed second copy of the weights for a few runs
    names = [o.name for o in sess.get_outputs()]
    results = [run(sess, feeds) for feeds in feeds_list]
    del sess
    return names, results


def compare(reference: Reference, candidate: onnx.ModelProto | GraphModel, *, batches=(1, 3), seed: int = 0,
            rtol: float = 1e-4) -> dict:
    """Run both models on random inputs; relative error = max|a-b| / max(max|a|, 1e-6) per output.

    The candidate runs first and its session is gone before the reference is opened and run."""
    feeds_list = [random_inputs(candidate, batch=batch, seed=seed + k) for k, batch in enumerate(batches)]
    cand_names, cand_results = _outputs(candidate, feeds_list)
    opened = reference() if callable(reference) else contextlib.nullcontext(reference)
    with opened as ref:
        ref_names, ref_results = _outputs(ref, feeds_list)
    if ref_names != cand_names:
        return {"ok": False, "reason": f"outputs differ: {ref_names} vs {cand_names}"}
    worst_abs, worst_rel = 0.0, 0.0
    for ref_out, cand_out in zip(ref_results, cand_results):
        for a, b in zip(ref_out, cand_out):
            if a.shape != b.shape:
                return {"ok": False, "reason": f"output shape {b.shape} != {a.shape}"}
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            fa, fb = np.isfinite(a64), np.isfinite(b64)
            # NaN/Inf (e.g. from NaN weights) must sit at the same places with the same value; a NaN
            # must never make the comparison vacuous (max() ignores NaN)
            if not np.array_equal(fa, fb) or not np.array_equal(a64[~fa], b64[~fb], equal_nan=True):
                return {"ok": False, "reason": "non-finite outputs differ", "max_abs_error": float("inf"),
                        "max_rel_error": float("inf"), "rtol": rtol, "batches": list(batches)}
            diff = float(np.max(np.abs(a64[fa] - b64[fa]))) if fa.any() else 0.0
            scale = max(float(np.max(np.abs(a64[fa]))) if fa.any() else 0.0, 1e-6)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    return {"ok": bool(worst_rel <= rtol), "max_abs_error": worst_abs, "max_rel_error": worst_rel, "rtol": rtol,
            "batches": list(batches)}
