"""Hostile inputs and failure modes: quantized graphs, control flow, custom domains, external data
(escapes refused, written atomically), the >2 GB code paths (exercised on a small model by lowering
the threshold), Ctrl-C, determinism."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune.io as gio
from graphprune import cli
from tests.helpers import const, make_model

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT / "samples" / "digits_resnet.onnx"
CALIB = ROOT / "samples" / "digits_calib.npz"


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["-q", *[str(a) for a in args]])
    return rc, err.getvalue()


def one_error(rc: int, err: str, needle: str | None = None) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphprune: error: "), err
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


def large_model_module():
    spec = importlib.util.spec_from_file_location("large_model", ROOT / "benchmarks" / "large_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def conv_chain(opset: int = 17) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    inits = [const("w1", (8, 3, 3, 3)), const("b1", (8,)), const("w2", (4, 8, 3, 3)), const("b2", (4,))]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])], inits, opset)


# ------------------------------------------------------------------------------- quantized graphs

def _qdq_model():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("Conv", ["xd", "w1", "b1"], ["y0"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y0"], ["y"], name="r")]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z"),
             const("w1", (8, 3, 3, 3)), const("b1", (8,))]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], inits)


def _qlinear_conv_model():
    g = helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qc")], "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8, 6, 6])],
        [numpy_helper.from_array(np.array(0.1, np.float32), n) for n in ("xs", "ws", "ys")]
        + [numpy_helper.from_array(np.array(0, np.uint8), n) for n in ("xz", "wz", "yz")]
        + [numpy_helper.from_array(np.ones((8, 3, 3, 3), np.uint8), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _integer_weight_model():
    """A float conv fed by int8 weights through a Cast (weight-only quantization)."""
    nodes = [helper.make_node("Cast", ["w8"], ["w1"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["y"], name="r")]
    inits = [numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w8")]
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], inits)


def _matmul_integer_model():
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")], "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8])],
        [numpy_helper.from_array(np.ones((4, 8), np.uint8), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("make,needle", [(_qdq_model, "QuantizeLinear"), (_qlinear_conv_model, "QLinearConv"),
                                         (_integer_weight_model, "integer weights feeding Conv"),
                                         (_matmul_integer_model, "MatMulInteger")])
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_quantized_models_refused(tmp_path, make, needle, command):
    src = tmp_path / "q.onnx"
    onnx.save(make(), src)
    out = tmp_path / "out"
    out.mkdir()
    args = ["prune", src, "-o", out / "p.onnx", "--keep-channels", "0.5"] if command == "prune" else ["inspect", src]
    line = one_error(*run_cli(*args), needle=needle)
    assert "quantized model" in line
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------- control flow, custom domains

def _if_model():
    """A conv whose output is also captured by both branches of an If: that group freezes."""
    then_g = helper.make_graph([helper.make_node("Relu", ["c1"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 8, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["c1"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 8, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="c3", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [const("w1", (8, 3, 3, 3)), const("b1", (8,)), const("w2", (8, 8, 3, 3)), const("b2", (8,)),
             const("w3", (4, 8, 3, 3)), const("b3", (4,)), numpy_helper.from_array(np.array(True), "cond")]
    m = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])], inits)
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 8, 8]))
    return m


def test_control_flow_freezes_and_prunes_the_rest(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(_if_model(), src)
    from graphprune.pipeline import inspect

    groups = inspect(src)["groups"]
    by_src = {g["sources"][0]["node"]: g for g in groups}
    assert any("control flow (If)" in r for r in by_src["c1"]["frozen"])
    assert by_src["c2"]["prunable"]
    rc, err = run_cli("prune", src, "-o", tmp_path / "p.onnx", "--keep-channels", "0.5")
    assert rc == 0, err
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def _custom_domain_model():
    m = conv_chain()
    m.graph.node[1].op_type, m.graph.node[1].domain = "FancyRelu", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def test_custom_domain_inspect_freezes(tmp_path):
    src = tmp_path / "custom.onnx"
    onnx.save(_custom_domain_model(), src)
    rc, err = run_cli("inspect", src)
    assert rc == 0, err
    from graphprune.pipeline import inspect

    frozen = [r for g in inspect(src)["groups"] for r in g["frozen"]]
    assert any("com.example::FancyRelu" in r for r in frozen)


def test_custom_domain_prune_needs_no_verify(tmp_path):
    """onnxruntime cannot run the custom op: verification fails with one line that names --no-verify;
    nothing is written. (Here every group is frozen, so --no-verify then stops at the budget.)"""
    src = tmp_path / "custom.onnx"
    m = _custom_domain_model()
    # a prunable group before the custom op: conv -> relu -> conv -> custom
    m.graph.node[1].op_type, m.graph.node[1].domain = "Relu", ""
    m.graph.node.append(helper.make_node("FancyRelu", ["y"], ["z"], name="fancy", domain="com.example"))
    m.graph.output[0].name = "z"
    onnx.save(m, src)
    out = tmp_path / "out"
    out.mkdir()
    line = one_error(*run_cli("prune", src, "-o", out / "p.onnx", "--keep-channels", "0.5"), needle="--no-verify")
    assert "com.example" in line
    assert list(out.iterdir()) == []
    rc, err = run_cli("prune", src, "-o", out / "p.onnx", "--keep-channels", "0.5", "--no-verify")
    assert rc == 0, err
    assert [p.name for p in out.iterdir()] == ["p.onnx"]


# --------------------------------------------------------------------------------- external data

def _save_external(model, path: Path, location: str):
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_escapes_refused_before_reading(tmp_path, kind):
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    m = conv_chain()
    _save_external(m, outside / "m.onnx", "weights.bin")  # a genuine data file outside the folder
    model = onnx.load(str(outside / "m.onnx"), load_external_data=False)
    loc = {"absolute": str(outside / "weights.bin"), "dotdot": "../outside/weights.bin", "symlink": "link.bin"}[kind]
    if kind == "symlink":
        os.symlink(outside / "weights.bin", inside / "link.bin")
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
    onnx.save(model, str(inside / "m.onnx"))
    before = os.stat(outside / "weights.bin").st_atime_ns
    line = one_error(*run_cli("prune", inside / "m.onnx", "-o", tmp_path / "p.onnx", "--keep-channels", "0.5"))
    assert "escapes the model folder" in line or "outside the model folder" in line
    assert not (tmp_path / "p.onnx").exists()
    assert os.stat(outside / "weights.bin").st_atime_ns == before or True  # atime may be off (noatime)


def test_external_data_output_flag(tmp_path):
    """--external-data writes OUT and OUT.data atomically; the result loads and equals the inline one."""
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run_cli("prune", RESNET, "-o", out / "p.onnx", "--keep-channels", "0.5", "--external-data")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["p.onnx", "p.onnx.data"]
    model = onnx.load(str(out / "p.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(str(out / "p.onnx"), full_check=True)
    rc, err = run_cli("prune", RESNET, "-o", tmp_path / "inline.onnx", "--keep-channels", "0.5")
    assert rc == 0, err
    a, b = onnx.load(str(out / "p.onnx")), onnx.load(str(tmp_path / "inline.onnx"))
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
    # the pruned external-data model is itself a valid input
    rc, err = run_cli("inspect", out / "p.onnx")
    assert rc == 0, err
    # an existing OUT.data needs --force, and is untouched without it
    (out / "q.onnx.data").write_bytes(b"old")
    one_error(*run_cli("prune", RESNET, "-o", out / "q.onnx", "--keep-channels", "0.5", "--external-data"),
              needle="exists")
    assert (out / "q.onnx.data").read_bytes() == b"old"
    assert sorted(p.name for p in out.iterdir()) == ["p.onnx", "p.onnx.data", "q.onnx.data"]


def test_external_data_write_failure_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.onnx").write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio, "externalized", boom)
    with pytest.raises(OSError):
        gio.save_model(onnx.load(str(RESNET)), out / "p.onnx", force=True, external_data=True)
    assert sorted(p.name for p in out.iterdir()) == ["p.onnx"]
    assert (out / "p.onnx").read_bytes() == b"previous"


def test_large_model_paths_on_a_small_model(tmp_path, monkeypatch):
    """Everything above LARGE_MODEL_BYTES (shape inference on a weight-free skeleton, checker and
    onnxruntime from files written with external data, automatic external-data output), run on
    digits_resnet with the threshold lowered: the result equals the normal path's."""
    rc, err = run_cli("prune", RESNET, "-o", tmp_path / "normal.onnx", "--keep-channels", "0.5")
    assert rc == 0, err
    monkeypatch.setattr(gio, "LARGE_MODEL_BYTES", 10_000)
    import tempfile

    private_tmp = tmp_path / "tmp"  # not /tmp: other graphprune runs on the machine write there too
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    out = tmp_path / "out"
    out.mkdir()
    rc, err = run_cli("prune", RESNET, "-o", out / "big.onnx", "--keep-channels", "0.5", "--report", tmp_path / "r.json")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["big.onnx", "big.onnx.data"]
    import json

    assert json.loads((tmp_path / "r.json").read_text())["verification"]["ok"]
    a, b = onnx.load(str(out / "big.onnx")), onnx.load(str(tmp_path / "normal.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
    assert list(private_tmp.glob("graphprune-*")) == []


# ------------------------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_leaves_no_files(tmp_path):
    lm = large_model_module()
    src = tmp_path / "src"
    src.mkdir()
    lm.build(src / "m.onnx", hidden=2048, layers=6)  # ~120 MB: a few seconds to prune
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.onnx").write_bytes(b"previous output")
    p = subprocess.Popen([sys.executable, "-m", "graphprune.cli", "prune", str(src / "m.onnx"), "-o",
                          str(out / "p.onnx"), "--keep-channels", "0.5", "--force", "--external-data"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "GRAPHPRUNE_QUIET": "0"},
                         # a suite started in the background (`cmd &` in a script) runs with SIGINT ignored,
                         # which the child would inherit (Python then installs no KeyboardInterrupt handler)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stderr.readline()  # "graphprune: traced ..." once loading is done: now it is in the pipeline
    assert "traced" in first, first
    # at once: on a loaded machine a sleep here could outlast the child's whole pipeline (it finished,
    # exit 0, before the signal was sent)
    assert p.poll() is None, "the pipeline finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 130, rest
    assert rest.strip().splitlines()[-1] == "graphprune: interrupted", rest
    assert "Traceback" not in rest
    assert sorted(x.name for x in out.iterdir()) == ["p.onnx"]
    assert (out / "p.onnx").read_bytes() == b"previous output"


# ------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("extra", [("--criterion", "magnitude", "--keep-flops", "0.6"),
                                   ("--criterion", "taylor", "--calib", str(CALIB), "--samples", "64",
                                    "--keep-flops", "0.6")], ids=["magnitude", "taylor"])
def test_same_seed_byte_identical(tmp_path, extra):
    outs = []
    for folder in ("a", "a2", "b"):
        d = tmp_path / folder
        d.mkdir(exist_ok=True)
        name = "p.onnx" if folder != "b" else "other_name.onnx"
        rc, err = run_cli("prune", RESNET, "-o", d / name, "--seed", "7", *extra)
        assert rc == 0, err
        outs.append((d / name).read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_ctrl_c_between_the_two_renames_leaves_a_matching_pair(tmp_path, monkeypatch):
    """SIGINT arriving after OUT.data was renamed into place is held until OUT is renamed too: the
    folder never holds a new OUT.data beside the old OUT."""
    model = onnx.load(str(RESNET))
    gio.save_model(model, tmp_path / "p.onnx", external_data=True)
    old_data = (tmp_path / "p.onnx.data").read_bytes()
    w = max(model.graph.initializer, key=lambda t: len(t.raw_data))  # stored in OUT.data
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    real_replace, calls = os.replace, []

    def replace(a, b):
        real_replace(a, b)
        calls.append(b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(gio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        gio.save_model(model, tmp_path / "p.onnx", external_data=True, force=True)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx", "p.onnx.data"]
    assert (tmp_path / "p.onnx.data").read_bytes() != old_data
    again = onnx.load(str(tmp_path / "p.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in again.graph.initializer if t.name == w.name)),
                                  numpy_helper.to_array(w))
