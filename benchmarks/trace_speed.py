"""Time tracing and pruning on large graphs (>1,000 ONNX nodes).

    python benchmarks/trace_speed.py            # prints a table, writes benchmarks/results/trace_speed.json

Graphs: a deep MobileNetV2-style stack exported with the TorchScript exporter and BatchNorm left
unfolded (many nodes per block), and a ResNet-50 (torch definition in samples/resnet50.py if present).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from converters.torch_to_onnx import export_module  # noqa: E402
from graphprune import log  # noqa: E402
from graphprune.io import load_model, opset_of  # noqa: E402
from graphprune.pipeline import PruneConfig, prune  # noqa: E402
from graphprune.planner import Budget  # noqa: E402
from graphprune.tracer import to_graph, trace  # noqa: E402
from samples.zoo import InvertedResidual, randomize_norm_stats  # noqa: E402


def deep_mobilenet(blocks: int) -> nn.Module:
    layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    layers += [InvertedResidual(32, 32, 1, 4) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    return randomize_norm_stats(nn.Sequential(*layers)).eval()


def measure(path: str) -> dict:
    t0 = time.perf_counter()
    model = load_model(path)
    t1 = time.perf_counter()
    tr = trace(to_graph(model), opset_of(model))
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        t3 = time.perf_counter()
        prune(path, os.path.join(d, "o.onnx"), PruneConfig(budget=Budget("flops", 0.6)))
        t4 = time.perf_counter()
    return {"nodes": len(model.graph.node), "groups": len(tr.groups), "load_s": round(t1 - t0, 3),
            "trace_s": round(t2 - t1, 3), "prune_total_s": round(t4 - t3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=120)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "trace_speed.json"))
    args = ap.parse_args()
    log.set_quiet(True)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "deep.onnx")
        export_module(deep_mobilenet(args.blocks), (torch.randn(1, 3, 16, 16),), p, fold_constants=False)
        results[f"deep_mobilenet_{args.blocks}_blocks"] = measure(p)
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"env": env, "results": results}, fh, indent=2)
    print(f"{'graph':32s} {'nodes':>6s} {'groups':>6s} {'load s':>7s} {'trace s':>8s} {'prune s':>8s}")
    for name, r in results.items():
        print(f"{name:32s} {r['nodes']:6d} {r['groups']:6d} {r['load_s']:7.2f} {r['trace_s']:8.2f} {r['prune_total_s']:8.2f}")


if __name__ == "__main__":
    main()
