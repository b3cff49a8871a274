"""Two things tried on the YOLOv8n-sized detector's efficiency gap (issue 13), measured side by side:

1. the stem at half a channel block: a two-conv graph like the detector's first layers (3 -> C conv
   stride 2 at 640x640, SiLU, C -> 32 conv stride 2, SiLU), batch 8, C = 16 (one AVX-512 NCHWc
   block), 12 and 8, timed interleaved;
2. onnxruntime's memory pattern off (``enable_mem_pattern=False``) on the dense and the pruned
   detector (the speed-up benchmark's files), each session timed interleaved with the others.

    python benchmarks/yolov8n_gap.py --dense W/yolov8n.onnx --pruned W/yolov8n_flops0.5-auto_b8.onnx
        [--runs 15] [--out benchmarks/results/yolov8n_gap]

(W: ``benchmarks/speedup.py``'s --work folder after its yolov8n rows.) One intra-op thread; p50 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _session(model, mem_pattern: bool = True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_mem_pattern = mem_pattern
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _stem(c: int) -> bytes:
    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["h"]),
             helper.make_node("Conv", ["h", "w1"], ["b"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Sigmoid", ["b"], ["s2"]), helper.make_node("Mul", ["b", "s2"], ["y"])]
    inits = [numpy_helper.from_array(r.standard_normal((c, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(r.standard_normal((32, c, 3, 3)).astype(np.float32), "w1")]
    g = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 640, 640])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _interleaved(sessions: dict, feeds: dict, runs: int) -> dict[str, float]:
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    times = {k: [] for k in sessions}
    for i in range(runs):
        keys = list(sessions)
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotating order
            t = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: round(1000 * float(np.median(v)), 2) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True)
    ap.add_argument("--pruned", required=True)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "yolov8n_gap"))
    args = ap.parse_args()
    x = np.random.default_rng(0).random((8, 3, 640, 640), dtype=np.float32)
    stem = _interleaved({f"stem {c} ch": _session(_stem(c)) for c in (16, 12, 8)}, {"x": x}, args.runs)
    print(stem, flush=True)
    sessions = {f"{name}, mem pattern {'on' if on else 'off'}": _session(path, on)
                for name, path in (("dense", args.dense), ("pruned", args.pruned)) for on in (True, False)}
    name = sessions["dense, mem pattern on"].get_inputs()[0].name
    det = _interleaved(sessions, {name: x}, args.runs)
    print(det, flush=True)
    ratio = {mode: round(det[f"dense, mem pattern {mode}"] / det[f"pruned, mem pattern {mode}"], 3) for mode in ("on", "off")}
    env = {"cpu": platform.processor() or platform.machine(), "onnxruntime": ort.__version__, "threads": 1,
           "runs": args.runs, "batch": 8}
    with open(args.out + ".json", "w") as f:
        json.dump({"env": env, "stem_ms": stem, "detector_ms": det, "speedup": ratio}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"`python benchmarks/yolov8n_gap.py` ({env}), p50 ms, interleaved\n\n")
        f.write("| stem graph (batch 8, 640x640) | ms |\n|---|---|\n")
        f.writelines(f"| {k} | {v} |\n" for k, v in stem.items())
        f.write("\n| detector (batch 8) | ms |\n|---|---|\n")
        f.writelines(f"| {k} | {v} |\n" for k, v in det.items())
        f.write(f"\nspeed-up dense/pruned: memory pattern on x{ratio['on']}, off x{ratio['off']}\n")


if __name__ == "__main__":
    main()
