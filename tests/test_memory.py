"""The weights are held once: load_and_trace reads them into the trace graph only (external data
straight from its file), verification runs the reference from those arrays (weights fed as inputs,
masked in place and restored), and pruning a model measures a bounded peak memory."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import graphprune.io as gio
from graphprune.errors import UserError
from graphprune.pipeline import load_and_trace
from graphprune.planner import Budget, make_plan
from graphprune.rewriter import apply_plan, masked_original, masked_view
from graphprune.runtime import GraphModel, random_inputs, session

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT / "samples" / "digits_resnet.onnx"
MOBILENET = ROOT / "samples" / "digits_mobilenet_v2.onnx"


def _large_model_module():
    spec = importlib.util.spec_from_file_location("large_model", ROOT / "benchmarks" / "large_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _outputs(model, batch=3, seed=0, like=None):
    feeds = random_inputs(like if like is not None else model, batch=batch, seed=seed)
    return session(model).run(None, feeds)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v3", "densenet", "inception", "vgg", "regnet_se"])
def test_graph_model_feeding_every_weight_equals_the_model(name, zoo_model):
    """GraphModel with every float constant fed as an input (min_bytes=0) computes what the exported
    ModelProto computes, on architectures covering BN, SE, Concat, Flatten->Gemm, grouped convs."""
    path = zoo_model(name, "torchscript")
    full = onnx.load(path)
    skeleton, tr = load_and_trace(path)
    gm = GraphModel(tr.graph, skeleton, min_bytes=0)
    assert gm.weights, "nothing was fed"
    assert not any(t.HasField("raw_data") and len(t.raw_data) > 64 for t in gm.model.graph.initializer
                   if t.name in gm.weights)
    for a, b in zip(_outputs(gm, like=skeleton), _outputs(full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_load_and_trace_keeps_one_copy_of_the_weights():
    skeleton, tr = load_and_trace(RESNET)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(RESNET)).graph.initializer}
    consts = [t for t in tr.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert consts and all(isinstance(t._values, np.ndarray) for t in consts)  # nothing lazily tied to a proto
    for t in consts:
        if t.name in original:
            np.testing.assert_array_equal(t.values, original[t.name])
    big = [t for t in skeleton.graph.initializer if original.get(t.name, np.zeros(0)).nbytes >= gio.WEIGHT_MIN_BYTES]
    assert big, "the sample should have weights above WEIGHT_MIN_BYTES"
    assert all(not t.HasField("raw_data") and t.data_location == onnx.TensorProto.EXTERNAL for t in big)


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def test_external_data_is_read_from_the_file_into_the_graph(tmp_path):
    model = onnx.load(str(RESNET))
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    _save_external(model, tmp_path / "m.onnx")  # (turns model's tensors into references)
    loaded = gio.load_model(tmp_path / "m.onnx", load_external=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer) > 10
    assert all(not t.HasField("raw_data") for t in loaded.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)
    skeleton, tr = load_and_trace(tmp_path / "m.onnx")
    tensors = tr.graph.tensors()
    for name, values in original.items():
        if name in tensors:
            np.testing.assert_array_equal(tensors[name].values, values)


def test_nan_in_an_external_weight_is_refused(tmp_path):
    model = onnx.load(str(RESNET))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[3] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    _save_external(model, tmp_path / "m.onnx")
    with pytest.raises(UserError, match="NaN"):
        load_and_trace(tmp_path / "m.onnx")


def test_external_data_length_that_does_not_match_the_shape_is_refused(tmp_path):
    model = onnx.load(str(RESNET))
    _save_external(model, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL and len(t.dims) == 4)
    entry = next(e for e in t.external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    (tmp_path / "m.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(UserError, match="bytes of external data"):
        load_and_trace(tmp_path / "m.onnx")


def _random_plan(tr, keep=0.5, seed=0):
    rng = np.random.default_rng(seed)
    scores = {g.id: rng.random(g.size) for g in tr.groups if g.prunable}
    return tr.removed_roots(make_plan(tr, scores, Budget("channels", keep, cap=0.95)).removed)


def test_masked_view_zeroes_in_place_and_restores_even_on_error():
    skeleton, tr = load_and_trace(MOBILENET)
    removed = _random_plan(tr)
    before = {t.name: t.values.copy() for t in tr.graph.tensors().values() if isinstance(t, gs.Constant)}
    reference = masked_original(tr, removed, skeleton)  # the copying construction, as a ModelProto
    with pytest.raises(RuntimeError, match="inside"):
        with masked_view(tr, removed, skeleton) as view:
            changed = [n for n, t in tr.graph.tensors().items()
                       if isinstance(t, gs.Constant) and not np.array_equal(t.values, before[n])]
            assert changed, "the view should write its zeros into the trace graph's arrays"
            for a, b in zip(_outputs(view, like=skeleton), _outputs(reference)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            raise RuntimeError("inside")
    for name, t in tr.graph.tensors().items():
        if isinstance(t, gs.Constant):
            np.testing.assert_array_equal(t.values, before[name])
    pruned = apply_plan(tr, removed, skeleton)  # and the rewrite still sees the original weights
    assert len(pruned.graph.initializer) > 0


def test_pruning_peak_memory_is_bounded(tmp_path):
    """A 270 MB model (weights in external data) pruned with verification: the peak resident memory
    above the interpreter's own (graphprune's imports, measured with `inspect` on a tiny model) stays
    under 2.25x the weights (1.89x measured: the weights once, the pruned model, onnxruntime's copy of
    it and transients). Before the weights were held once, the same run took about 6x."""
    lm = _large_model_module()
    info = lm.build(tmp_path / "m.onnx", hidden=4096, layers=4)
    weights_mb = info["data_bytes"] / 2**20
    tiny = tmp_path / "tiny.onnx"
    onnx.save(onnx.load(str(RESNET)), str(tiny))
    base = lm.run_graphprune("inspect", tiny, timeout=600)
    assert base["rc"] == 0, base["stderr"]
    res = lm.run_prune(tmp_path / "m.onnx", tmp_path / "p.onnx", "--keep-channels", "0.5",
                       "--report", tmp_path / "r.json", timeout=600)
    assert res["rc"] == 0, res["stderr"]
    base_mb, peak_mb = base["peak_rss_mb"], res["peak_rss_mb"]
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["ok"]
    used = peak_mb - base_mb
    print(f"weights {weights_mb:.0f} MB, peak {peak_mb:.0f} MB, interpreter {base_mb:.0f} MB, "
          f"used {used:.0f} MB = {used / weights_mb:.2f}x")
    assert used < 2.25 * weights_mb, f"pruning used {used:.0f} MB for {weights_mb:.0f} MB of weights"


def test_failed_fold_round_trip_keeps_the_weights(monkeypatch):
    """If re-importing the folded graph fails, tracing goes on with the folded graph, whose weights
    were stubbed for the round trip: they must be back (never a stub left in a graph)."""
    import graphprune.tracer as tracer
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)  # 75 KB: a weight
    nodes = [helper.make_node("Identity", ["w"], ["wi"], name="id"),
             helper.make_node("Gemm", ["x", "wi"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    real, calls = gs.import_onnx, []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("re-import failed")
        return real(m)

    monkeypatch.setattr(tracer.gs, "import_onnx", flaky)
    g = tracer.to_graph(model)
    assert len(calls) == 2
    consts = [t for t in g.tensors().values() if isinstance(t, gs.Constant) and t.values.size == w.size]
    assert consts and all(np.array_equal(t.values.reshape(w.shape), w) for t in consts)


def test_streamed_write_gives_the_bytes_of_serialize_to_string(tmp_path):
    """save_model writes one initializer at a time; the file must be exactly what SerializeToString
    (and onnx.save) would write, also for a pruned model whose graph has fields after the initializers."""
    skeleton, tr = load_and_trace(MOBILENET)
    pruned = gio.infer_shapes(apply_plan(tr, _random_plan(tr), skeleton))
    assert len(pruned.graph.value_info) > 0
    for model in (onnx.load(str(RESNET)), pruned):
        gio.save_model(model, tmp_path / "m.onnx", force=True)
        assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()
