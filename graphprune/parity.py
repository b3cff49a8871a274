"""Numerical parity between a pruned model and its masked original."""
from __future__ import annotations

import numpy as np
import onnx

from .runtime import random_inputs, run, session


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, batches=(1, 3), seed: int = 0,
            rtol: float = 1e-4) -> dict:
    """Run both models on random inputs; relative error = max|a-b| / max(max|a|, 1e-6) per output."""
    ref_sess, cand_sess = session(reference), session(candidate)
    worst_abs, worst_rel = 0.0, 0.0
    outputs = [o.name for o in reference.graph.output]
    cand_outputs = [o.name for o in candidate.graph.output]
    if outputs != cand_outputs:
        return {"ok": False, "reason": f"outputs differ: {outputs} vs {cand_outputs}"}
    for k, batch in enumerate(batches):
        feeds = random_inputs(reference, batch=batch, seed=seed + k)
        for a, b in zip(run(ref_sess, feeds), run(cand_sess, feeds)):
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
