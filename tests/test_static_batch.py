"""Models exported with a static batch (detectors' export scripts, old zoo files, `graphprune convert
--static-batch`): onnxruntime runs over data sets go B samples at a time, calibration statistics
run at batch B and recovery's mini-batches in forward passes of B, so `prune --calib --eval` works
on them instead of failing on the first batch of 32."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphprune.curvature.data import load_calib
from graphprune.runtime import run, session, static_batch
from tests.helpers import const


def _mlp(batch) -> onnx.ModelProto:
    """x (batch, 6) -> Gemm -> Relu -> Reshape to (batch, 2, 4) with the batch written into the
    shape constant when it is static (as TorchScript's static exports write view(1, ...))."""
    shape = [batch if isinstance(batch, int) else -1, 2, 4]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    rng = np.random.default_rng(1)  # the same weights for every batch variant
    inits = [const("w", (8, 6), rng), const("b", (8,), rng), onnx.numpy_helper.from_array(np.array(shape, np.int64), "s")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_static_batch_is_read_off_the_inputs():
    assert static_batch(_mlp(1)) == 1 and static_batch(_mlp(2)) == 2 and static_batch(_mlp("N")) is None


@pytest.mark.parametrize("batch", [1, 2])
def test_run_feeds_a_static_batch_model_b_samples_at_a_time(batch):
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    (want,) = run(session(_mlp("N")), {"x": x})
    (got,) = run(session(_mlp(batch)), {"x": x})  # 5 samples: chunks of B, the last one padded
    assert got.shape == (5, 2, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_calibration_set_is_cut_to_whole_static_batches(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((7, 6), np.float32), labels=np.arange(7))
    data = load_calib(_mlp(2), str(path), 128)
    assert len(data) == 6 and len(data.labels) == 6
    assert len(load_calib(_mlp(1), str(path), 128)) == 7


def test_prune_with_calibration_and_eval_on_a_static_batch_export(tmp_path, capfd, monkeypatch):
    """`graphprune convert --static-batch` then `prune --calib --eval` (Taylor scores from
    mini-batch gradients, OBS compensation, recovery, accuracy): it used to end in a one-line ORT
    error (a raw traceback with --recover 0); now every mini-batch runs in forward passes of 1, so
    the result equals the dynamic-batch export's (the same channels removed, the same recovery
    loss and accuracy), and the output keeps the static batch."""
    import json

    from graphprune import log
    from graphprune.cli import main

    monkeypatch.setattr(log, "_quiet", False)
    reports, texts = {}, {}
    for kind in ("static", "dynamic"):
        src = str(tmp_path / f"{kind}.onnx")
        assert main(["convert", "samples/digits.py:digits_resnet", "--weights", "samples/digits_resnet.pt",
                     "--input-shape", "1,1,8,8", "-o", src] + (["--static-batch"] if kind == "static" else [])) == 0
        assert static_batch(onnx.load(src)) == (1 if kind == "static" else None)
        out = str(tmp_path / f"{kind}_p.onnx")
        capfd.readouterr()
        assert main(["prune", src, "-o", out, "--keep-flops", "0.5", "--calib", "samples/digits_calib.npz",
                     "--samples", "64", "--recover", "20", "--eval", "samples/digits_test.npz",
                     "--report", str(tmp_path / f"{kind}.json")]) == 0
        err = capfd.readouterr()
        texts[kind] = err.out + err.err
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
        assert static_batch(onnx.load(out)) == (1 if kind == "static" else None)
    assert "static batch of 1" in texts["static"] and "forward passes of 1" in texts["static"]
    assert "static batch" not in texts["dynamic"]
    removed = {k: [g.get("removed") for g in r["groups"]] for k, r in reports.items()}
    assert removed["static"] == removed["dynamic"] and any(removed["static"])
    acc = [line for k in ("static", "dynamic") for line in texts[k].splitlines() if line.startswith("accuracy:")]
    assert len(acc) == 2 and acc[0] == acc[1], acc


def test_a_model_that_cannot_take_the_calibration_batch_is_a_one_line_error(tmp_path, capfd):
    """A declared dynamic batch with the batch 1 baked into a Reshape (x (N, 6) -> (1, 2, 4)): the
    calibration mini-batch cannot go through it. One error line naming the Reshape, a non-zero
    exit, no output file, no traceback; the PyTorch executor itself names the failing node."""
    from converters.onnx_to_torch import ExecutionError, TorchGraph
    from graphprune.cli import main

    m = _mlp("N")
    for init in m.graph.initializer:
        if init.name == "s":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 2, 4], np.int64), "s"))
    src, out = tmp_path / "baked.onnx", tmp_path / "p.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32))
    capfd.readouterr()
    code = main(["prune", str(src), "-o", str(out), "--keep-flops", "0.5", "--criterion", "fisher",
                 "--calib", str(tmp_path / "c.npz")])
    err = capfd.readouterr().err
    assert code != 0 and not out.exists()
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Reshape" in lines[0] and "Traceback" not in err, err
    import torch

    tg = TorchGraph(onnx.load(str(src)))
    with pytest.raises(ExecutionError, match=r"node '.*' \(Reshape\): shape"):
        tg(x=torch.zeros(4, 6))


def test_recovery_on_a_static_batch_of_two_with_odd_counts(tmp_path):
    """A static batch of 2 with 11 calibration samples (cut to 10), recovery mini-batches of 3 (cut
    to 2) and mixed inputs whose count is not a multiple of 2: every forward pass gets exactly 2
    samples (padded, then dropped) and the run finishes with a verified model."""
    from graphprune.pipeline import PruneConfig, prune
    from graphprune.planner import Budget

    src = tmp_path / "b2.onnx"
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["g"], transB=1), helper.make_node("Reshape", ["g", "s"], ["y"])]
    inits = [const("w", (8, 6), rng), const("b", (8,), rng), const("w2", (4, 8), rng),
             onnx.numpy_helper.from_array(np.array([2, 2, 2], np.int64), "s")]  # the batch 2 written in
    g = helper.make_graph(nodes, "mlp2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 2])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((11, 6)).astype(np.float32))
    rep = prune(src, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5), calib=str(tmp_path / "c.npz"),
                                                      batch_size=3, recover_batch=3, recover=4))
    assert rep["verification"]["ok"]
    assert static_batch(onnx.load(str(tmp_path / "p.onnx"))) == 2
