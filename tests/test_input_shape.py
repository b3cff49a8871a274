"""Input sizes of models with dynamic dimensions (`--input-shape`, calibration shapes, bad dims).

Every command is run in-process through ``graphprune.cli.main`` (a traceback fails the test):
MACs at the real size against an independent count from onnxruntime's shapes, the output keeping
its symbolic dims, parity at a second size, and one-line errors for every input dimension value."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import cli
from graphprune.parity import compare
from tests.macs import count_macs


@pytest.fixture(scope="session")
def dyn_resnet(tmp_path_factory):
    """The zoo ResNet exported by the TorchScript exporter with dynamic batch, height and width."""
    import torch

    from samples import zoo

    path = tmp_path_factory.mktemp("dyn") / "resnet_dyn.onnx"
    torch.onnx.export(zoo.make("resnet_basic").eval(), (zoo.example_input("resnet_basic", 1, 0),), str(path),
                      dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}})
    return str(path)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(capsys, *args, needle: str = "") -> str:
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), err
    assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def dims_of(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------- inspect / MACs
def test_dynamic_size_without_input_shape_is_one_line_error(capsys, dyn_resnet):
    line = one_line_error(capsys, "inspect", dyn_resnet, needle="--input-shape")
    assert "'x'" in line and "height" in line and "width" in line


@pytest.mark.parametrize("size", [(64, 64), (40, 24)])
def test_macs_at_the_given_size_match_an_independent_count(capsys, dyn_resnet, size):
    rc, out, _ = run_cli(capsys, "inspect", dyn_resnet, "--json", "--input-shape", f"1,3,{size[0]},{size[1]}")
    assert rc == 0
    info = json.loads(out)
    assert info["input_shapes"] == {"x": [1, 3, *size]}
    assert info["macs"] == pytest.approx(count_macs(dyn_resnet, {"x": (1, 3, *size)}), rel=1e-9)


def test_calibration_shapes_serve_and_input_shape_wins(capsys, dyn_resnet, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 3, 48, 48)).astype(np.float32))
    rc, out, _ = run_cli(capsys, "inspect", dyn_resnet, "--json", "--calib", calib)
    assert rc == 0 and json.loads(out)["input_shapes"] == {"x": [1, 3, 48, 48]}
    rc, out, _ = run_cli(capsys, "inspect", dyn_resnet, "--json", "--calib", calib, "--input-shape", "x:1,3,32,32")
    assert rc == 0 and json.loads(out)["input_shapes"] == {"x": [1, 3, 32, 32]}


# ------------------------------------------------------------------------------------- prune
def test_prune_dynamic_model_at_its_size(capsys, dyn_resnet, tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    rc, _, err = run_cli(capsys, "prune", dyn_resnet, "-o", out, "--keep-flops", "0.7", "--input-shape", "1,3,64,64",
                         "--report", rep)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert report["input_shapes"] == {"x": [1, 3, 64, 64]}
    sizes = report["verification"]["sizes"]
    assert {"x": [1, 3, 64, 64]} in sizes and len({tuple(s["x"][2:]) for s in sizes}) == 2  # a second size ran
    pruned = onnx.load(str(out))
    assert dims_of(pruned.graph.input[0]) == ["batch", 3, "height", "width"]  # still dynamic
    before, after = (count_macs(p, {"x": (1, 3, 64, 64)}) for p in (dyn_resnet, str(out)))
    assert after <= 0.72 * before
    assert report["totals"]["macs_after"] == pytest.approx(after, rel=1e-9)
    # the pruned model runs at yet another size and still equals the masked original there
    rc, stdout, err = run_cli(capsys, "verify", dyn_resnet, out, "--report", rep, "--input-shape", "1,3,40,56")
    assert rc == 0 and "1x3x40x56" in stdout, err


def test_bench_and_verify_take_input_shape(capsys, dyn_resnet, tmp_path):
    one_line_error(capsys, "bench", dyn_resnet, "--batch", "1", "--runs", "1", needle="--input-shape")
    js = tmp_path / "b.json"
    rc, out, err = run_cli(capsys, "bench", dyn_resnet, "--batch", "2", "--runs", "2", "--warmup", "0",
                           "--input-shape", "1,3,40,40", "--json", js)
    assert rc == 0, err
    assert json.loads(js.read_text())["settings"]["input_shapes"] == {"x": [1, 3, 40, 40]}


# ------------------------------------------------------------------------- bad --input-shape
@pytest.mark.parametrize("spec,needle", [
    ("1,3,64", "has rank 4"),
    ("1,3,a,64", "positive integers"),
    ("1,3,0,64", "positive integer"),
    ("1,3,-5,64", "positive integer"),
    ("1,4,64,64", "dimension 1 is fixed at 3"),
    ("y:1,3,64,64", "no input 'y'"),
    ("1,3,100000,100000", "GiB"),
])
def test_bad_input_shape_values(capsys, dyn_resnet, spec, needle):
    one_line_error(capsys, "inspect", dyn_resnet, "--input-shape", spec, needle=needle)


def test_input_shape_twice_and_multi_input_needs_names(capsys, dyn_resnet, tmp_path):
    one_line_error(capsys, "inspect", dyn_resnet, "--input-shape", "1,3,8,8", "--input-shape", "x:1,3,8,8",
                   needle="twice")
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4, "h", "w"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Conv", ["s", "w"], ["y"])],
                          "two", [a, b], [y], [w])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    one_line_error(capsys, "inspect", path, "--input-shape", "1,4,8,8", needle="name one per flag")
    rc, out, err = run_cli(capsys, "inspect", path, "--json", "--input-shape", "a:1,4,8,8", "--input-shape", "b:1,4,8,8")
    assert rc == 0, err
    assert json.loads(out)["macs"] == 4 * 4 * 64


# ------------------------------------------------------------- every input dimension value
def _conv_model(dims, *, shape=True, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, dims) if shape else helper.make_empty_tensor_value_info("x")
    if shape is False:
        x.type.tensor_type.elem_type = elem
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h2", "w2"])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1] * 4), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])


def _write_raw_dims(model: onnx.ModelProto, values: list) -> onnx.ModelProto:
    """Dims written as raw dim_value (-1, 0, ...) the way some exporters write them."""
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for v in values:
        d = shape.dim.add()
        if isinstance(v, str):
            d.dim_param = v
        elif v is not None:
            d.dim_value = v
    return model


@pytest.mark.parametrize("dims,error", [
    ([-1, 3, 16, 16], None),                # -1 batch: dynamic batch
    ([1, 3, -1, -1], "dimension 2 is dynamic"),
    ([1, 3, 0, 16], "dimension 2 is dynamic"),
    ([1, 3, "h", "w"], "dimension 2 is dynamic"),
    ([1, 3, None, 16], "dimension 2 is dynamic"),  # dim without value or name
    ([1, 3, 1 << 40, 1 << 40], None),       # huge: checked below
    (None, "fails onnx.checker"),           # no shape at all: the checker refuses the input
])
@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_any_input_dimension_value(capsys, tmp_path, dims, error, command):
    model = _conv_model([1, 3, 16, 16]) if dims is None else _write_raw_dims(_conv_model([1, 3, 16, 16]), dims)
    if dims is None:
        model.graph.input[0].type.tensor_type.ClearField("shape")
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "o.onnx"
    args = ["inspect", path, "--json"] if command == "inspect" else ["prune", path, "-o", out, "--keep-flops", "0.6"]
    if dims is not None and any(isinstance(d, int) and d > 1 << 30 for d in dims):
        rc, _, err = run_cli(capsys, *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "graphprune: error:" in err, err
        assert not out.exists()
        return
    if error:
        one_line_error(capsys, *args, needle=error)
        assert not out.exists()
        if dims is None:
            return
        # the same model with its size given works
        rc, _, err = run_cli(capsys, *args, "--input-shape", "1,3,16,16")
        assert rc == 0, err
    else:
        rc, _, err = run_cli(capsys, *args)
        assert rc == 0, err
    if command == "prune":
        pruned = onnx.load(str(out))
        want = ["?" if d is None or (isinstance(d, int) and d <= 0) else d for d in (dims or [])]
        got = ["?" if not (d.HasField("dim_value") and d.dim_value > 0) and not d.dim_param else
               (d.dim_value if d.HasField("dim_value") else d.dim_param) for d in pruned.graph.input[0].type.tensor_type.shape.dim]
        assert got == want  # the input's declared dims are kept as they were


# ----------------------------------------------------------------- the second parity size
def _reshape_model(fixed: bool) -> onnx.ModelProto:
    """Conv -> Reshape(N, C, H*W) with the shape computed from Shape (dynamic) or baked in."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "hw"])
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((3, 2, 1, 1)).astype(np.float32), "w")
    if fixed:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "s"], ["y"])]
        inits = [w, numpy_helper.from_array(np.array([0, 3, 64], np.int64), "s")]
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
                 helper.make_node("Reshape", ["c", "s"], ["y"])]
        inits = [w, numpy_helper.from_array(np.array([0, 3, -1], np.int64), "s")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])


def test_second_size_catches_a_baked_shape_and_skips_where_the_original_cannot():
    from graphprune.shapes import second_size

    dyn, baked = _reshape_model(False), _reshape_model(True)
    shapes = {"x": (1, 2, 8, 8)}
    second = second_size(dyn, shapes, {"c": [1, 3, 8, 8]})
    assert second == {"x": (1, 2, 7, 7)}  # nothing downsamples: stride 1, one step down
    # a candidate whose shape was baked in fails at the second size where the reference runs
    res = compare(dyn, baked, shapes=shapes, second={"x": (1, 2, 4, 4)})
    assert not res["ok"] and "cannot run at" in res["reason"]
    # a reference that itself only runs at one size: the second size is skipped, and said so
    res = compare(baked, baked, shapes=shapes, second={"x": (1, 2, 4, 4)})
    assert res["ok"] and "second_size_skipped" in res


def test_compress_onnx_source_at_the_given_size(capsys, dyn_resnet, tmp_path):
    out, rep = tmp_path / "c.onnx", tmp_path / "c.json"
    rc, stdout, err = run_cli(capsys, "compress", dyn_resnet, "-o", out, "--keep-flops", "0.7", "--input-shape",
                              "1,3,48,48", "--bench-batch", "2", "--bench-runs", "2", "--report", rep)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert report["input_shapes"] == {"x": [1, 3, 48, 48]}
    assert report["bench"]["rows"] and report["bench"]["rows"][0]["batch"] == 2
    assert report["totals"]["macs_before"] == pytest.approx(count_macs(dyn_resnet, {"x": (1, 3, 48, 48)}), rel=1e-9)
    assert dims_of(onnx.load(str(out)).graph.input[0]) == ["batch", 3, "height", "width"]
