"""`graphprune convert`: PyTorch (factory file, TorchScript, .pt2) -> ONNX, via the CLI and the Python API."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from converters.load_torch import SourceError, convert, load_source, parse_input_shape  # noqa: E402
from converters.torch_to_onnx import ConversionError  # noqa: E402
from graphprune import cli  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = f"{ROOT / 'samples' / 'digits.py'}:digits_resnet"
DIGITS_WEIGHTS = str(ROOT / "samples" / "digits_resnet.pt")
ZOO = ROOT / "samples" / "zoo.py"
ENV = {**os.environ, "GRAPHPRUNE_QUIET": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn
    from helper_mod import SCALE  # sibling import: the file's folder is on sys.path while importing

    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Linear(5, 8)
        def forward(self, x, y):
            return self.a(x).mean((2, 3)) * SCALE + self.b(y)

    class Eig(nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real

    def two_inputs():
        torch.manual_seed(0)
        return TwoIn()

    def eig():
        return Eig()

    def boom():
        raise RuntimeError("factory exploded\\nsecond line")

    def not_a_module():
        return {"a": 1}

    NOT_CALLABLE = 3
''')


# --------------------------------------------------------------------------- helpers
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=120)


def assert_user_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("graphprune: error:")
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


class _Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inproc(capfd, *args):
    """The CLI's main() in this process (cheap), stdout/stderr captured at the fd level."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capfd.readouterr()
    return _Proc(rc, out, err)


def no_leftovers(folder: Path, allowed=()):
    left = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    assert not [n for n in left if n.endswith(".tmp") or n.endswith(".onnx")], left


def run_onnx(path, *arrays):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    d = tmp_path_factory.mktemp("factories")
    (d / "helper_mod.py").write_text("SCALE = 2.0\n")
    (d / "models.py").write_text(FACTORIES)
    return d / "models.py"


@pytest.fixture(scope="module")
def digits_torch():
    from samples.digits import digits_resnet

    m = digits_resnet()
    m.load_state_dict(torch.load(DIGITS_WEIGHTS, map_location="cpu", weights_only=True))
    return m.eval()


# --------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cli_digits_with_weights(tmp_path, digits_torch, exporter):
    out = tmp_path / f"digits_{exporter}.onnx"
    proc = run_cli("convert", DIGITS, "--weights", DIGITS_WEIGHTS, "--input-shape", "1,1,8,8",
                   "--exporter", exporter, "-o", out)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1 and "nodes" in line and "opset" in line and "params" in line
    assert f"exporter {exporter}" in line and "input[batch,1,8,8]" in line
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        (y,) = run_onnx(out, x)
        with torch.no_grad():
            ref = digits_torch(torch.from_numpy(x)).numpy()
        assert y.shape == (batch, 10)
        assert np.abs(y - ref).max() < 1e-4
    no_leftovers(tmp_path, allowed={out.name})


def test_python_api_zoo_factory_static_batch(tmp_path):
    from samples import zoo

    out = tmp_path / "rb.onnx"
    res = convert(f"{ZOO}:resnet_basic", out, input_shapes=[(2, 3, 32, 32)], dynamic_batch=False, opset=13,
                  input_names=["image"])
    assert res == str(out)
    import onnx

    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 32, 32]
    assert next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 13
    # the factory is untrained and random; just check the graph runs with the static shape
    (y,) = run_onnx(out, np.zeros((2, 3, 32, 32), np.float32))
    assert y.shape == (2, zoo.NUM_CLASSES)


def test_two_inputs_and_sibling_import(tmp_path, factories, capfd):
    out = tmp_path / "two.onnx"
    proc = run_inproc(capfd, "convert", f"{factories}:two_inputs", "--input-shape", "1,3,6,6",
                      "--input-shape", "1,5", "--input-name", "img", "--input-name", "vec", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "img[batch,3,6,6]" in proc.stdout and "vec[batch,5]" in proc.stdout
    model, kind = load_source(f"{factories}:two_inputs")
    assert kind == "factory"
    x, v = np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32), \
        np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    (y,) = run_onnx(out, x, v)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(v)).numpy()
    assert np.abs(y - ref).max() < 1e-4


def test_torchscript_file(tmp_path, digits_torch):
    ts = tmp_path / "digits_ts.pt"
    torch.jit.trace(digits_torch, torch.randn(1, 1, 8, 8)).save(str(ts))
    out = tmp_path / "ts.onnx"
    proc = run_cli("convert", ts, "--input-shape", "1,1,8,8", "-o", out)
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    (y,) = run_onnx(out, x)
    with torch.no_grad():
        assert np.abs(y - digits_torch(torch.from_numpy(x)).numpy()).max() < 1e-4
    # a scripted module through the Python API; dynamo on a ScriptModule is explained
    scripted = tmp_path / "scripted.ts"
    torch.jit.script(digits_torch).save(str(scripted))
    convert(str(scripted), tmp_path / "scripted.onnx", input_shapes=[(1, 1, 8, 8)])
    with pytest.raises(ConversionError, match="dynamo exporter cannot convert a TorchScript module.*torchscript"):
        convert(str(scripted), tmp_path / "nope.onnx", input_shapes=[(1, 1, 8, 8)], exporter="dynamo")
    assert not (tmp_path / "nope.onnx").exists()


def test_exported_program(tmp_path, digits_torch, capfd):
    pt2 = tmp_path / "digits.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(digits_torch, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(pt2))
    out = tmp_path / "pt2.onnx"
    # no --input-shape needed: shapes come from the program's example inputs; exporter defaults to dynamo
    proc = run_cli("convert", pt2, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "exporter dynamo" in proc.stdout
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, 1, 8, 8)).astype(np.float32)
        (y,) = run_onnx(out, x)
        with torch.no_grad():
            assert np.abs(y - digits_torch(torch.from_numpy(x)).numpy()).max() < 1e-4
    # torchscript exporter on a .pt2 is refused with an explanation; a shape that does not fit too
    bad = run_inproc(capfd, "convert", pt2, "-o", tmp_path / "x.onnx", "--exporter", "torchscript")
    assert_user_error(bad, "--exporter dynamo")
    bad = run_inproc(capfd, "convert", pt2, "-o", tmp_path / "x.onnx", "--input-shape", "1,1,9,9")
    assert_user_error(bad, "cannot be re-shaped")
    assert not (tmp_path / "x.onnx").exists()


def test_force_overwrites(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    convert(DIGITS, out, input_shapes=[(1, 1, 8, 8)], weights=DIGITS_WEIGHTS, force=True)
    assert out.stat().st_size > 1000
    no_leftovers(tmp_path, allowed={out.name})


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape(" 8 , 5 ") == (8, 5)
    for bad in ("", "1,a", "1,0,3", "-1,3", "1,,3", "1.5,2", "abc"):
        with pytest.raises(SourceError):
            parse_input_shape(bad)


# --------------------------------------------------------------------------- errors (subprocess)
def test_cli_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    assert_user_error(run_cli("convert", f"{tmp_path / 'nope.py'}:f", "--input-shape", "1,2", "-o", out),
                      "no such file")
    assert not out.exists()


def test_cli_unsafe_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"conv.weight": Evil()}, str(evil))
    # sanity: an unrestricted unpickle of this file would create the marker
    probe = tmp_path / "probe_marker"
    torch.save({"x": type("E", (), {"__reduce__": lambda s: (open, (str(probe), "w"))})()}, str(tmp_path / "p.pt"))
    torch.load(str(tmp_path / "p.pt"), weights_only=False)
    assert probe.exists()

    out = tmp_path / "o.onnx"
    proc = run_cli("convert", DIGITS, "--weights", evil, "--input-shape", "1,1,8,8", "-o", out)
    line = assert_user_error(proc, "refusing to unpickle", "weights_only=True")
    assert "open" in line
    assert not marker.exists()
    assert not out.exists()


def test_cli_state_dict_as_source(tmp_path):
    out = tmp_path / "o.onnx"
    proc = run_cli("convert", DIGITS_WEIGHTS, "--input-shape", "1,1,8,8", "-o", out)
    assert_user_error(proc, "not a TorchScript archive", ":factory --weights")
    assert not out.exists()


def test_cli_existing_output_untouched(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous model")
    proc = run_cli("convert", DIGITS, "--weights", DIGITS_WEIGHTS, "--input-shape", "1,1,8,8", "-o", out)
    assert_user_error(proc, "exists", "--force")
    assert out.read_bytes() == b"previous model"
    no_leftovers(tmp_path, allowed={out.name})


def test_cli_exporter_failure_suggests_other(tmp_path, factories):
    out = tmp_path / "o.onnx"
    proc = run_cli("convert", f"{factories}:eig", "--input-shape", "1,4,4", "-o", out)
    assert_user_error(proc, "torchscript exporter failed", "linalg_eig", "--exporter dynamo")
    assert not out.exists()
    no_leftovers(tmp_path)


# --------------------------------------------------------------------------- errors (in process)
@pytest.mark.parametrize("case", [
    "bad_spec", "py_without_factory", "not_py", "missing_attr", "not_callable", "factory_raises", "non_module",
    "onnx_source", "missing_shape", "weights_wrong_arch", "weights_with_torchscript", "same_as_source",
    "missing_weights", "output_folder_missing",
])
def test_user_errors(tmp_path, factories, capfd, case):
    out = tmp_path / "o.onnx"
    f = factories
    shape = ["--input-shape", "1,1,8,8"]
    args, frag = {
        "bad_spec": ([f"{f}:not-an-id", *shape], "bad source"),
        "py_without_factory": ([str(f), *shape], ":FACTORY"),
        "not_py": ([f"{tmp_path}", *shape], "cannot tell"),
        "missing_attr": ([f"{f}:nope", *shape], "has no attribute 'nope'"),
        "not_callable": ([f"{f}:NOT_CALLABLE", *shape], "not a callable factory"),
        "factory_raises": ([f"{f}:boom", *shape], "RuntimeError: factory exploded"),
        "non_module": ([f"{f}:not_a_module", *shape], "returned a dict"),
        "onnx_source": ([str(ROOT / "samples" / "digits_resnet.onnx"), *shape], "already an ONNX model"),
        "missing_shape": ([DIGITS], "--input-shape is required"),
        "weights_wrong_arch": ([f"{ZOO}:resnet_basic", "--weights", DIGITS_WEIGHTS, "--input-shape", "1,3,32,32"],
                               "weights do not fit the model"),
        "weights_with_torchscript": ([str(tmp_path / "m.pt"), "--weights", DIGITS_WEIGHTS, *shape],
                                     "--weights only applies"),
        "same_as_source": None,
        "missing_weights": ([DIGITS, "--weights", str(tmp_path / "w.pt"), *shape], "no such file"),
        "output_folder_missing": None,
    }.get(case) or (None, None)
    if case == "same_as_source":
        src = tmp_path / "copy.py"
        src.write_text((ROOT / "samples" / "digits.py").read_text())
        before = src.read_bytes()
        proc = run_inproc(capfd, "convert", f"{src}:digits_resnet", *shape, "-o", src, "--force")
        assert_user_error(proc, "refusing to overwrite the input")
        assert src.read_bytes() == before
        return
    if case == "output_folder_missing":
        out = tmp_path / "missing" / "o.onnx"
        args, frag = [DIGITS, *shape], "output folder does not exist"
    proc = run_inproc(capfd, "convert", *args, "-o", out)
    line = assert_user_error(proc, frag)
    if case == "factory_raises":
        assert "second line" not in line
    if case == "weights_wrong_arch":
        assert "missing" in line and "unexpected" in line
    assert not out.exists()
    no_leftovers(tmp_path)


@pytest.mark.parametrize("text", ["1,a", "", "0,3", "1x3x8x8", "-1,2"])
def test_bad_input_shape_strings(tmp_path, capfd, text):
    out = tmp_path / "o.onnx"
    proc = run_inproc(capfd, "convert", DIGITS, "--input-shape", text, "-o", out)
    assert_user_error(proc, "--input-shape")
    assert not out.exists()


def test_python_api_errors_are_conversion_errors(tmp_path, factories):
    from graphprune.commands.convert import convert as cli_convert
    from graphprune.errors import UserError

    with pytest.raises(ConversionError, match="returned a dict"):
        convert(f"{factories}:not_a_module", tmp_path / "o.onnx", input_shapes=[(1, 2)])
    with pytest.raises(UserError, match="has no attribute"):
        cli_convert(f"{factories}:nope", tmp_path / "o.onnx", input_shapes=[(1, 2)])
    with pytest.raises(ConversionError, match="unknown exporter"):
        convert(DIGITS, tmp_path / "o.onnx", input_shapes=[(1, 1, 8, 8)], exporter="tf")
    with pytest.raises(ConversionError, match="forward failed"):  # wrong shape for the model
        convert(DIGITS, tmp_path / "o.onnx", input_shapes=[(1, 3, 8, 8)])
    no_leftovers(tmp_path)


def test_no_temp_file_on_interrupt(tmp_path, monkeypatch):
    """A KeyboardInterrupt during export leaves neither the output nor a temporary file behind."""
    import converters.torch_to_onnx as t2o

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    monkeypatch.setattr(t2o.torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(DIGITS, out, input_shapes=[(1, 1, 8, 8)], force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
