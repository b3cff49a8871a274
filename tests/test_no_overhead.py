"""No overhead added: a pruned model has no more nodes than its original, and onnxruntime's
optimised graph of it fuses as the original's does (same fused-conv / blocked-layout kernels, no
extra layout reorders), compared on the optimised models onnxruntime writes out
(SessionOptions.optimized_model_filepath). Widths in whole blocks of 16 (what --round-to auto snaps
to on this CPU: onnxruntime's NCHWc kernels work in 16-channel blocks on AVX-512, 8 on AVX2)."""
from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest

from graphprune import planner
from graphprune.config import PruneConfig
from graphprune.pipeline import prune
from graphprune.planner import Budget
from tests.test_round_auto import SmoothTable, StaircaseTable

#: optimised-graph ops that are fusions or blocked-layout kernels: the pruned graph has at least as
#: many of each (a layer that left the blocked kernels would show as one fewer nchwc Conv)
FUSED = ("com.microsoft.nchwc:Conv", "com.microsoft:FusedConv", "com.microsoft:FusedGemm",
         "com.microsoft:FusedMatMul", "com.microsoft:SkipLayerNormalization", "com.microsoft:BiasGelu",
         "com.microsoft:FastGelu", "com.microsoft:Attention", "com.microsoft:MultiHeadAttention",
         "com.microsoft.nchwc:MaxPool", "com.microsoft.nchwc:AveragePool", "com.microsoft.nchwc:GlobalAveragePool",
         "com.microsoft.nchwc:GlobalMaxPool")
REORDERS = ("com.microsoft.nchwc:ReorderInput", "com.microsoft.nchwc:ReorderOutput")


def optimized_ops(path, tmp_path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = tmp_path / (path.stem + ".optimized.onnx")
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in onnx.load(out).graph.node)


def check_no_overhead(dense_path, pruned_path, tmp_path) -> None:
    dense, pruned = onnx.load(dense_path), onnx.load(pruned_path)
    assert len(pruned.graph.node) <= len(dense.graph.node)
    d, p = optimized_ops(dense_path, tmp_path), optimized_ops(pruned_path, tmp_path)
    assert sum(p.values()) <= sum(d.values()), (d, p)
    for op in FUSED:
        assert p[op] >= d[op], (op, d[op], p[op], d, p)
    conv = ("Conv", "com.microsoft:FusedConv", "com.microsoft.nchwc:Conv")
    assert [p[op] for op in conv] == [d[op] for op in conv], (d, p)  # every conv keeps its kernel family
    assert sum(p[op] for op in REORDERS) <= sum(d[op] for op in REORDERS), (d, p)


def _prune(src, out, budget, **kw):
    rep = prune(str(src), str(out), PruneConfig(budget=budget, force=True, verify=False, **kw))
    assert rep["totals"]["macs_ratio"] < 0.95, "something was pruned"
    return rep


@pytest.mark.parametrize("name, exporter", [
    ("resnet_basic", "torchscript"), ("resnet_bottleneck", "dynamo"), ("mobilenet_v2", "torchscript"),
    ("mobilenet_v3", "dynamo"), ("densenet", "torchscript"), ("inception", "dynamo"), ("resnext", "torchscript"),
    ("regnet_se", "dynamo"), ("shufflenet", "dynamo"), ("vgg", "torchscript"), ("silu_net", "dynamo"),
])
def test_zoo_pruned_in_blocks_fuses_like_dense(zoo_model, tmp_path, name, exporter):
    from pathlib import Path

    src = Path(zoo_model(name, exporter))
    out = tmp_path / f"{name}_pruned.onnx"
    _prune(src, out, Budget("flops", 0.5, round_to=16, best_effort=True))
    check_no_overhead(src, out, tmp_path)


def test_yolov8_and_vit_have_no_extra_nodes(tmp_path):
    from pathlib import Path

    from samples.producers import yolov8

    model, info = yolov8(dynamic=False, imgsz=64)
    src = tmp_path / "yolov8.onnx"
    onnx.save(model, src)
    _prune(src, tmp_path / "yolo_pruned.onnx", Budget("flops", 0.5, round_to=16, best_effort=True))
    check_no_overhead(src, tmp_path / "yolo_pruned.onnx", tmp_path)
    vit = Path(__file__).resolve().parents[1] / "samples" / "digits_vit.onnx"
    _prune(vit, tmp_path / "vit_pruned.onnx", Budget("flops", 0.5, round_to=16, best_effort=True))
    check_no_overhead(vit, tmp_path / "vit_pruned.onnx", tmp_path)


@pytest.mark.parametrize("tables", ["staircase", "smooth"])
def test_round_to_auto_on_a_block_staircase_fuses_like_dense(zoo_model, tmp_path, monkeypatch, tables):
    """--round-to auto keeps every conv in its kernel family: with tables that have 16-channel steps,
    and with smooth tables (no step: a layer timed alone does not see the reorders a graph gets)
    on a CPU whose blocked kernels work in 16 channels (the groups that reach a Conv planned in
    whole blocks)."""
    from pathlib import Path

    src = Path(zoo_model("mobilenet_v2", "dynamo"))
    made = []
    base = StaircaseTable if tables == "staircase" else SmoothTable

    class Table(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if tables == "smooth":
                self.channel_block = 16
            made.append(self)

    monkeypatch.setattr("graphprune.latency.LatencyTable", Table)
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    _prune(src, tmp_path / "auto.onnx", Budget("flops", 0.5, round_to="auto", best_effort=True), latency_batch=2)
    assert made, "the staircase table was used"
    check_no_overhead(src, tmp_path / "auto.onnx", tmp_path)


def test_unrounded_widths_are_what_breaks_fusion(zoo_model, tmp_path):
    """The other side: widths off the 16-channel blocks leave convs out of the blocked kernels
    (what --round-to auto exists for); on a CPU without NCHWc kernels there is nothing to see."""
    from pathlib import Path

    src = Path(zoo_model("resnet_basic", "torchscript"))
    out = tmp_path / "r1.onnx"
    planner_rank = planner.RANK_BY_LATENCY
    _prune(src, out, Budget("flops", 0.5, round_to=1))
    assert planner.RANK_BY_LATENCY == planner_rank
    d, p = optimized_ops(src, tmp_path), optimized_ops(out, tmp_path)
    if d["com.microsoft.nchwc:Conv"] == 0:
        pytest.skip("this CPU build has no NCHWc kernels")
    assert len(onnx.load(out).graph.node) <= len(onnx.load(src).graph.node)  # still no extra nodes
    assert p["com.microsoft.nchwc:Conv"] < d["com.microsoft.nchwc:Conv"]
