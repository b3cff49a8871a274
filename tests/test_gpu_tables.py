"""Latency tables per provider and precision: CUDA and TensorRT tables (fp32/fp16, I/O binding,
warm-up through engine builds) where onnxruntime has those providers; on a CPU-only build the
requests fall back to CPU (and are cached as CPU tables) and the GPU tests skip."""
from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from graphprune.latency import LatencyTable

AVAILABLE = ort.get_available_providers()
HAS_CUDA = "CUDAExecutionProvider" in AVAILABLE
HAS_TRT = "TensorrtExecutionProvider" in AVAILABLE
CONV = {"op": "Conv", "attrs": {"pads": [1, 1, 1, 1]}, "in_shape": [1, 32, 8, 8], "kernel": [3, 3], "groups": 1,
        "depthwise": False, "out": 32, "in": 32}
MATMUL = {"op": "MatMul", "attrs": {}, "in_shape": [1, 4, 32], "kernel": [], "groups": 1, "depthwise": False,
          "out": 32, "in": 32}


def test_fp16_tables_are_separate_from_fp32(tmp_path):
    cache = tmp_path / "lat.json"
    for precision in ("fp32", "fp16"):
        t = LatencyTable("cpu", 2, cache, precision=precision)
        got = t.axis_times(CONV, "out", [8, 16, 32])
        assert set(got) == {8, 16, 32} and all(v > 0 for v in got.values())
        assert t.axis_times(MATMUL, "in", [8, 32]).keys() == {8, 32}
        t.save()
    keys = list(json.loads(cache.read_text()))
    assert sum("|fp16|" in k for k in keys) == sum("|fp16|" not in k for k in keys) == 5
    model, feeds = LatencyTable("cpu", 2, cache, precision="fp16")._context_model(CONV, 8, 32)
    assert model.graph.input[0].type.tensor_type.elem_type == 10 and feeds["x"].dtype.name == "float16"


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available: nothing to fall back from")
def test_gpu_request_without_gpu_measures_and_caches_as_cpu(tmp_path, capsys):
    t = LatencyTable("cuda", 2, tmp_path / "lat.json")
    assert "falling back to CPUExecutionProvider" in capsys.readouterr().err
    assert not t.on_gpu and t.prefix.startswith("cpu|")
    assert t.axis_times(CONV, "out", [16]).keys() == {16}


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not in onnxruntime providers")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_tables(tmp_path, precision):
    t = LatencyTable("cuda", 8, tmp_path / "lat.json", precision=precision)
    assert t.on_gpu and t.io_binding and t.prefix.startswith("cuda|")
    got = t.axis_times(CONV, "out", [8, 16, 24, 32])
    assert len(got) == 4 and all(v > 0 for v in got.values())
    dense, pruned = t.measure_pair(t._context_model(CONV, 32, 32)[0], t._context_model(CONV, 16, 32)[0])
    assert dense > 0 and pruned > 0 and t.last_pair["runs"] >= 60


@pytest.mark.skipif(not HAS_TRT, reason="TensorrtExecutionProvider not in onnxruntime providers")
def test_tensorrt_tables_warm_up_through_engine_builds(tmp_path):
    t = LatencyTable("tensorrt", 8, tmp_path / "lat.json", precision="fp16", runs=5)
    assert t.on_gpu and t.prefix.startswith("tensorrt|")
    got = t.axis_times(CONV, "in", [16, 32])
    assert len(got) == 2 and all(v > 0 for v in got.values())
