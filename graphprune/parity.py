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


#: ops whose outputs saturate in a bounded range: an output of one is compared on the scale of that
#: range (a saturated sigmoid of 1e-7 carries onnxruntime's ~1e-7 absolute rounding, not a relative
#: error), and its input, the logits, is compared too: that is where a wrong rewrite shows
SATURATING = {"Sigmoid": 1.0, "HardSigmoid": 1.0, "Softmax": 1.0, "Tanh": 1.0, "Erf": 1.0}


def _proto(model) -> onnx.ModelProto:
    return model.model if isinstance(model, GraphModel) else model


def saturated_outputs(model) -> dict[str, tuple[str, float]]:
    """{graph output: (its logits tensor, the op's output range)} for outputs of saturating ops."""
    g = _proto(model).graph
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    for o in model.graph.output if isinstance(model, GraphModel) else g.output:
        node = producer.get(o.name)
        if node is not None and node.op_type in SATURATING and node.input and node.input[0]:
            out[o.name] = (node.input[0], SATURATING[node.op_type])
    return out


@contextlib.contextmanager
def _extra_outputs(model, names: list[str]):
    """``model`` with ``names`` added as graph outputs for the duration (in place: no copy)."""
    g = _proto(model).graph
    known = {o.name for o in g.output}
    added = [n for n in names if n not in known]
    g.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in added)
    try:
        yield
    finally:
        if added:
            del g.output[len(g.output) - len(added):]


def _outputs(model, feeds_list: list[dict], optional: int = 0, extra=()) -> tuple[list[str], list]:
    """Outputs of ``model`` on each feed; the last ``optional`` feeds may fail (None then)."""
    from .errors import UserError

    with _extra_outputs(model, list(extra)):
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
    (relative to the output's magnitude, not element by element). An output of a saturating op
    (Sigmoid, Softmax, Tanh, ...) is measured on the scale of the op's range instead (its tiny
    saturated values carry the op's absolute rounding), and its input, the logits, is compared on
    its own magnitude as well, so a wrong rewrite cannot hide behind saturation.

    ``shapes`` ({input: dims}, graphprune.shapes.resolve) is the size the batches run at; ``second``
    an optional second size (models with dynamic height/width/length: it catches a size baked in
    by the rewrite), run at batch 2. When the reference itself cannot run at ``second``, that size
    is skipped and the result says so. The candidate runs first and its session is gone before the
    reference is opened and run."""
    feeds_list = [random_inputs(candidate, batch=batch, seed=seed + k, shapes=shapes) for k, batch in enumerate(batches)]
    if second is not None:
        feeds_list.append(random_inputs(candidate, batch=2, seed=seed + len(batches), shapes=second))
    optional = int(second is not None)
    saturated = saturated_outputs(candidate)
    cand_extra = [v[0] for v in saturated.values()]
    cand_names, cand_results = _outputs(candidate, feeds_list, optional, cand_extra)
    opened = reference() if callable(reference) else contextlib.nullcontext(reference)
    with opened as ref:
        # logits compared where the reference computes a tensor of the same name (always, for a
        # reference built from the same trace graph)
        ref_tensors = {o for n in _proto(ref).graph.node for o in n.output}
        ref_extra = [t for t in cand_extra if t in ref_tensors]
        ref_names, ref_results = _outputs(ref, feeds_list, optional, ref_extra)
    keep = [k for k, n in enumerate(cand_names) if n in ref_names or n not in cand_extra]
    cand_names = [cand_names[k] for k in keep]
    cand_results = [r if isinstance(r, Exception) else [r[k] for k in keep] for r in cand_results]
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
    floors = [saturated[n][1] if n in saturated else 1e-6 for n in ref_names]
    if ref_extra:
        info["logits_compared"] = sorted(set(ref_extra))
    worst_abs, worst_rel = 0.0, 0.0
    for ref_out, cand_out in zip(ref_results, cand_results):
        for a, b, floor in zip(ref_out, cand_out, floors):
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
            scale = max(float(np.max(np.abs(a64[fa]))) if fa.any() else 0.0, floor)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    return {"ok": bool(worst_rel <= rtol), "max_abs_error": worst_abs, "max_rel_error": worst_rel, **info}


def _size_of(feeds: dict) -> dict:
    return {k: list(v.shape) for k, v in feeds.items()}
