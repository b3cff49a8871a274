"""Models in the idioms of third-party exporters (samples/producers.py): paddle2onnx (PP-OCR detector
and recogniser), Caffe2-era model-zoo files at opset 7-9, YOLOv8 as its trainer exports it, tf2onnx.

Each is pruned to 70% of its MACs at a small real size: parity with the masked original at two
input sizes where the model is dynamic, a checker-valid output at the upgraded opset for legacy
files, the input's symbolic dims kept, MACs counted independently from onnxruntime's shapes, and
the groups that must prune prune while what must stay freezes with its reason."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphprune.pipeline import PruneConfig, inspect, prune
from graphprune.planner import Budget
from samples import producers
from tests.macs import count_macs

def _static_rec(**kwargs):
    """The recogniser with its input fixed at 1x3x48x64 while its outputs keep the exporter's
    symbolic dims (shape inference of the pruned graph resolves them: the signature must stay)."""
    model, info = producers.paddle_rec(seq="reshape", **kwargs)
    return producers.fix_input_shape(model, [1, 3, 48, 64]), {**info, "second_shape": None}


CASES = {
    "paddle_rec_reshape_static": (_static_rec, {}, None),
    "paddle_det": (producers.paddle_det, {}, (1, 3, 64, 64)),
    "paddle_det_opset12_minus_one": (producers.paddle_det, {"opset": 12, "minus_one": True}, (1, 3, 64, 64)),
    "paddle_rec": (producers.paddle_rec, {}, (1, 3, 48, 64)),
    "paddle_rec_reshape": (producers.paddle_rec, {"seq": "reshape"}, (1, 3, 48, 64)),
    "caffe2_opset7": (producers.caffe2_zoo, {"opset": 7}, None),
    "caffe2_opset8": (producers.caffe2_zoo, {"opset": 8}, None),
    "caffe2_opset9": (producers.caffe2_zoo, {"opset": 9}, None),
    "yolov8_dynamic": (producers.yolov8, {"dynamic": True, "imgsz": 64}, (1, 3, 64, 64)),
    "yolov8_static": (producers.yolov8, {"dynamic": False, "imgsz": 64, "opset": 17}, None),
    "tf2onnx": (producers.tf2onnx_cnn, {}, None),
    "tf2onnx_dynamic": (producers.tf2onnx_cnn, {"dynamic": True}, (1, 32, 32, 3)),
}


@pytest.fixture(scope="session")
def producer_models(tmp_path_factory):
    """name -> (path, info, size) for every case, built once per session."""
    d = tmp_path_factory.mktemp("producers")
    out = {}
    for name, (build, kwargs, size) in CASES.items():
        model, info = build(**kwargs)
        path = d / f"{name}.onnx"
        onnx.save(model, str(path))
        out[name] = (str(path), info, size)
    return out


@pytest.fixture(scope="session")
def pruned_producers(producer_models, tmp_path_factory):
    """name -> (original path, pruned path, report, sizes), pruned once per session."""
    d = tmp_path_factory.mktemp("producers_pruned")
    cache = {}

    def get(name):
        if name not in cache:
            path, info, size = producer_models[name]
            shapes = {info["input"]: size} if size else None
            out = d / f"{name}_pruned.onnx"
            report = prune(path, out, PruneConfig(budget=Budget("flops", 0.7), input_shapes=shapes))
            cache[name] = (path, str(out), report, shapes)
        return cache[name]

    return get


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _declared(path) -> list:
    m = onnx.load(path)
    inits = {t.name for t in m.graph.initializer}  # IR 3 files list their weights as inputs too
    # -1 and 0 (paddle2onnx writes -1) mean "dynamic": graphprune writes them as unknown dims
    return [["?" if isinstance(d, int) and d <= 0 else d for d in _dims(i)] for i in m.graph.input
            if i.name not in inits]


@pytest.mark.parametrize("name", sorted(CASES))
def test_prunes_with_parity_at_its_sizes(pruned_producers, name):
    path, out, report, shapes = pruned_producers(name)
    v = report["verification"]
    assert v["ok"] and v["max_rel_error"] <= 1e-4, v
    onnx.checker.check_model(out, full_check=True)
    sizes = {tuple(tuple(d[1:]) for d in s.values()) for s in v["sizes"]}
    dynamic = CASES[name][2] is not None
    assert len(sizes) == (2 if dynamic else 1), v["sizes"]  # a second size ran where sizes are dynamic
    assert "second_size_skipped" not in v
    assert _declared(out) == _declared(path)  # symbolic / -1 dims kept as they were declared
    size = {k: tuple(s) for k, s in report["input_shapes"].items()}
    before, after = count_macs(path, size), count_macs(out, size)
    assert report["totals"]["macs_before"] == pytest.approx(before, rel=1e-9)
    assert report["totals"]["macs_after"] == pytest.approx(after, rel=1e-9)
    assert after <= 0.72 * before


@pytest.mark.parametrize("name", ["paddle_det", "yolov8_dynamic", "tf2onnx_dynamic"])
def test_pruned_dynamic_model_runs_at_another_size(pruned_producers, producer_models, name):
    _, out, _, _ = pruned_producers(name)
    info = producer_models[name][1]
    shape = [2, *info["second_shape"][1:]]
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    y = sess.run(None, {info["input"]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    assert all(np.all(np.isfinite(t)) for t in y)


@pytest.mark.parametrize("name", ["caffe2_opset7", "caffe2_opset8", "caffe2_opset9"])
def test_legacy_opsets_are_upgraded(pruned_producers, name):
    _, out, report, _ = pruned_producers(name)
    assert report["opset_upgraded"]["from"] == int(name[-1]) and report["opset_upgraded"]["to"] == 11
    assert next(o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx")) == 11


def _frozen(path, size, info) -> dict[str, list[str]]:
    rep = inspect(path, {info["input"]: size} if size else None)
    return {s["node"]: g["frozen"] for g in rep["groups"] if not g["prunable"] for s in g["sources"]}, rep


def test_what_freezes_and_why(producer_models):
    reasons = {}
    for name, (path, info, size) in producer_models.items():
        frozen, rep = _frozen(path, size, info)
        reasons[name] = frozen
        assert rep["prunable_groups"] >= 3, (name, frozen)
    # paddle2onnx detector: FPN convs feeding Resize-by-computed-sizes and the Add joins prune; only
    # the one-channel probability map stays
    for name in ("paddle_det", "paddle_det_opset12_minus_one"):
        (only,) = reasons[name].values()
        assert len(only) == 1 and "reaches graph output" in only[0], reasons[name]
    # recognisers: only the per-position class layer (softmax over the classes) stays
    for name in ("paddle_rec", "paddle_rec_reshape", "paddle_rec_reshape_static"):
        assert len(reasons[name]) == 1
    # model zoo: LRN mixes neighbouring channels, the classifier feeds a Softmax
    for name in ("caffe2_opset7", "caffe2_opset8", "caffe2_opset9"):
        assert sorted(r for rs in reasons[name].values() for r in rs) == [
            "Softmax across the channel axis", "no channel rule for LRN"]
    # YOLOv8: the box branch's DFL bins, the class count and the fixed DFL conv stay (the Reshape to
    # (b, 4, 16, a) regroups them); everything in the backbone, neck and both head branches prunes
    for name in ("yolov8_dynamic", "yolov8_static"):
        frozen = reasons[name]
        assert all("/detect/" in node for node in frozen), frozen
        assert {n for n in frozen if "cv2" in n} == {f"/detect/cv2.{i}/cv2.{i}.2/Conv" for i in range(3)}
        assert {n for n in frozen if "cv3" in n} <= {f"/detect/cv3.{i}/cv3.{i}.2/Conv" for i in range(3)}
        assert all(rs for rs in frozen.values())  # each with a reason
    # tf2onnx: NHWC Transpose pairs, ReduceMean and the dense MatMul/Einsum layers prune
    for name in ("tf2onnx", "tf2onnx_dynamic"):
        assert list(reasons[name].values()) == [["Softmax across the channel axis"]]


def test_producer_idioms_are_present(producer_models):
    """The samples really use the idioms the tests claim (guards against a builder drifting)."""
    ops = {name: collections.Counter(n.op_type for n in onnx.load(p).graph.node)
           for name, (p, _, _) in producer_models.items()}
    assert {"Constant", "HardSigmoid", "Clip", "ConvTranspose", "Resize", "Shape", "Slice", "Concat",
            "BatchNormalization"} <= set(ops["paddle_det"])
    assert {"Sum", "LRN", "Dropout", "Reshape", "Gemm", "Softmax"} <= set(ops["caffe2_opset8"])
    assert {"Split", "MaxPool", "Concat", "Softmax", "Reshape", "Transpose"} <= set(ops["yolov8_dynamic"])
    assert {"Transpose", "MatMul", "Einsum", "ReduceMean", "Reshape"} <= set(ops["tf2onnx"])


def test_legacy_upgrade_is_said_on_one_line_and_quantized_legacy_files_are_refused(producer_models, tmp_path,
                                                                                     capsys, monkeypatch):
    from onnx import TensorProto, helper, numpy_helper

    from graphprune import cli, log

    monkeypatch.setattr(log, "_quiet", False)  # conftest silences progress lines
    path = producer_models["caffe2_opset9"][0]
    assert cli.main(["prune", path, "-o", str(tmp_path / "o.onnx"), "--keep-flops", "0.7"]) == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if "upgraded" in ln]
    assert len(said) == 1 and "opset 9 upgraded to opset 11" in said[0], err
    # a quantized model at a legacy opset (QuantizeLinear exists from opset 10): refused, not upgraded
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "w"], ["y"])]
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    q = tmp_path / "q10.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 10)], ir_version=5), str(q))
    assert cli.main(["-q", "prune", str(q), "-o", str(tmp_path / "q.onnx"), "--keep-flops", "0.7"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "quantized" in lines[0] and "upgraded" not in lines[0], lines
    assert not (tmp_path / "q.onnx").exists()
