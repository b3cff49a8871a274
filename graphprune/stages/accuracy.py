"""Stage: accuracy. Top-1 accuracy of a model on labelled data (``--eval``), before and after."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx

from ..runtime import GraphModel, run, session
from ..tracer import Trace


def evaluate(model: onnx.ModelProto | GraphModel, data_path: str | os.PathLike) -> float:
    """Top-1 accuracy of output 0 on an .npz with one array per input (or one unnamed) and `labels`."""
    from ..calib import load_labelled

    feeds, labels = load_labelled(model, data_path)
    sess = session(model)
    correct, n = 0, len(labels)
    names = list(feeds)
    for start in range(0, n, 256):
        batch = {k: feeds[k][start:start + 256] for k in names}
        logits = run(sess, batch)[0]
        correct += int(np.sum(np.argmax(logits.reshape(len(logits), -1), axis=1) == labels[start:start + 256]))
    return correct / max(n, 1)


def accuracy_before(model, tr: Trace, eval_data: str | None, timings: dict) -> float | None:
    """Accuracy of the original on --eval data, measured before scoring or compensation touch the
    trace graph (which holds the original's only copy of the weights)."""
    if not eval_data:
        return None
    t = time.perf_counter()
    accuracy = evaluate(GraphModel(tr.graph, model), eval_data)
    timings["evaluate"] = time.perf_counter() - t
    return accuracy
