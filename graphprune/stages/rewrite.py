"""Stage: rewrite. The pruned ONNX model for a removal: channels sliced out of initializers and shape
constants, shapes re-inferred, checked by onnx.checker, with the original's signature."""
from __future__ import annotations

import time

import onnx

from ..io import check_output, infer_shapes
from ..memory import trim
from ..rewriter import apply_plan
from ..tracer import Trace
from .load import keep_signature, signature


def checked(pruned: onnx.ModelProto, model: onnx.ModelProto, what: str = "pruned model") -> onnx.ModelProto:
    """``pruned`` with the original's declared outputs, after onnx.checker and the signature check
    (a failure is a bug, never the user's fault: the traceback is kept)."""
    pruned = keep_signature(infer_shapes(pruned), model)
    try:
        check_output(pruned)
    except Exception as exc:
        raise RuntimeError(f"internal error: {what} fails onnx.checker: {exc}") from exc
    if signature(pruned) != signature(model):
        raise RuntimeError(f"internal error: {what} changed the input/output signature")
    return pruned


def rewrite(tr: Trace, removed_roots, model: onnx.ModelProto, timings: dict, tag: str = "") -> onnx.ModelProto:
    t = time.perf_counter()
    pruned = apply_plan(tr, removed_roots, model)
    trim()  # the rewrite's sliced copies are in ``pruned`` now
    pruned = checked(pruned, model)
    timings[tag + "rewrite"] = time.perf_counter() - t
    return pruned
