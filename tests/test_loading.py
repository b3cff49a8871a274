"""Loading real exported models: external data (and its safety checks), opsets, both exporters,
dynamic batch, Constant-node weights and unfolded BatchNormalization."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT))
from converters.torch_to_onnx import ConversionError, export_module  # noqa: E402
from samples import zoo  # noqa: E402


def gp(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphprune.cli", "-q", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def assert_user_error(r, needle=None):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), r.stderr
    if needle:
        assert any(n in lines[0] for n in ([needle] if isinstance(needle, str) else needle)), lines[0]
    return lines[0]


def no_leftovers(folder: Path, *names):
    for n in names:
        assert not (folder / n).exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


class Exports:
    """Module-scoped cache: (model, exporter, opset, fold) -> exported .onnx path."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, name, exporter="torchscript", opset=None, fold=True) -> Path:
        key = (name, exporter, opset, fold)
        if key not in self.cache:
            p = self.root / f"{name}_{exporter}_{opset}_{int(fold)}.onnx"
            try:
                export_module(zoo.make(name), zoo.example_input(name), p, exporter=exporter, opset=opset,
                              fold_constants=fold)
                self.cache[key] = p
            except ConversionError as exc:
                self.cache[key] = exc
        value = self.cache[key]
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def newest_torchscript_opset(exports):
    for opset in (21, 20, 19, 18):
        try:
            exports.get("resnet_basic", "torchscript", opset)
            return opset
        except ConversionError:
            continue
    pytest.skip("the torchscript exporter supports no opset in 18..21")


def ort_run(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def prune_and_verify(src: Path, tmp_path: Path, *extra, keep="0.6", tag="p"):
    out, rep = tmp_path / f"{tag}.onnx", tmp_path / f"{tag}.json"
    r = gp("prune", src, "-o", out, "--keep-flops", keep, "--report", rep, *extra)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["budget_met"] is True and report["totals"]["macs_ratio"] <= float(keep) + 1e-9
    assert report["totals"]["channels_removed"] > 0
    v = gp("verify", src, out, "--report", rep)
    assert v.returncode == 0, v.stdout + v.stderr
    return out, report


def dim0(model: onnx.ModelProto, which="input"):
    vi = (model.graph.input if which == "input" else model.graph.output)[0]
    return vi.type.tensor_type.shape.dim[0]


def check_dynamic_batch(src: Path, out: Path, name: str):
    orig, pruned = onnx.load(str(src)), onnx.load(str(out))
    for which in ("input", "output"):
        d0, p0 = dim0(orig, which), dim0(pruned, which)
        assert d0.dim_param, f"exported {which} should have a symbolic batch"
        assert p0.dim_param == d0.dim_param and not p0.HasField("dim_value"), (which, p0)
    assert [(o.domain, o.version) for o in pruned.opset_import] == [(o.domain, o.version) for o in orig.opset_import]
    shape = zoo.input_shape(name)
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, *shape[1:])).astype(np.float32)
        y = ort_run(out, x)[0]
        assert y.shape == (b, zoo.NUM_CLASSES) and np.all(np.isfinite(y))


# --------------------------------------------------------------------------- opsets and exporters
@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
@pytest.mark.parametrize("opset", [11, 13, 17, "newest"])
def test_torchscript_opsets(exports, tmp_path, name, opset, newest_torchscript_opset):
    opset = newest_torchscript_opset if opset == "newest" else opset
    src = exports.get(name, "torchscript", opset)
    assert onnx.load(str(src)).opset_import[0].version == opset
    out, _ = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, name)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_dynamo_exporter(exports, tmp_path, name):
    src = exports.get(name, "dynamo")
    out, _ = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, name)


def test_dynamo_exporter_unoptimized(exports, tmp_path):
    """optimize=False: conv biases arrive as Expand(CastLike(0, input), Shape(W)), BN unfolded."""
    src = exports.get("resnet_basic", "dynamo", fold=False)
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    assert "BatchNormalization" in ops
    out, _ = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, "resnet_basic")


def test_torchscript_unfolded_batchnorm(exports, tmp_path):
    src = exports.get("resnet_basic", "torchscript", 17, fold=False)
    orig = onnx.load(str(src))
    assert sum(n.op_type == "BatchNormalization" for n in orig.graph.node) >= 10
    out, _ = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, "resnet_basic")
    pruned = onnx.load(str(out))
    inits = {t.name: t for t in pruned.graph.initializer}
    # BN parameters shrink with the conv they follow
    for n in pruned.graph.node:
        if n.op_type == "BatchNormalization":
            sizes = {inits[i].dims[0] for i in n.input[1:]}
            assert len(sizes) == 1
    assert sum(n.op_type == "BatchNormalization" for n in pruned.graph.node) == \
        sum(n.op_type == "BatchNormalization" for n in orig.graph.node)


def _to_constant_nodes(src: Path, dst: Path) -> None:
    m = onnx.load(str(src))
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
              for i, t in enumerate(m.graph.initializer)]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_constant_nodes_feeding_conv_weights(exports, tmp_path, name):
    src = tmp_path / "const.onnx"
    _to_constant_nodes(exports.get(name), src)
    assert not onnx.load(str(src)).graph.initializer
    out, report = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, name)
    # same plan as for the initializer version of the model
    _, ref = prune_and_verify(exports.get(name), tmp_path, tag="ref")
    assert [g["removed"] for g in report["groups"]] == [g["removed"] for g in ref["groups"]]
    # and the original (Constant-node) model computes what the pruned one does, up to the pruning
    x = np.random.default_rng(0).standard_normal(zoo.input_shape(name)).astype(np.float32)
    np.testing.assert_allclose(ort_run(src, x)[0], ort_run(exports.get(name), x)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- external data
def save_external(src: Path, folder: Path, location="w.bin") -> Path:
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    dst = folder / "m.onnx"
    onnx.save(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return dst


def rewrite_locations(path: Path, location: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(path))


@pytest.mark.parametrize("location", ["w.bin", "data/weights.bin"])
def test_external_data_loads_and_prunes(exports, tmp_path, location):
    d = tmp_path / "model"
    src = save_external(exports.get("resnet_basic"), d, location)
    assert (d / location).is_file()
    m = onnx.load(str(src), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    r = gp("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    ref = json.loads(gp("inspect", exports.get("resnet_basic"), "--json").stdout)
    assert json.loads(r.stdout)["macs"] == ref["macs"] and json.loads(r.stdout)["params"] == ref["params"]
    out, _ = prune_and_verify(src, tmp_path)
    check_dynamic_batch(src, out, "resnet_basic")
    # the pruned model is usable on its own: no reference into the source folder
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / "p.onnx")
    x = np.zeros(zoo.input_shape("resnet_basic"), np.float32)
    assert ort_run(alone / "p.onnx", x)[0].shape == (1, zoo.NUM_CLASSES)


def _fifo(path: Path) -> Path:
    """A FIFO: reading it blocks forever, so a rejection that reads first would time out."""
    os.mkfifo(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "symlink"), reason="needs POSIX fifo/symlink")
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "dotdot_nested", "symlink", "symlink_dir"])
@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_external_data_escaping_folder_rejected_before_reading(exports, tmp_path, kind, command):
    d = tmp_path / "model"
    src = save_external(exports.get("resnet_basic"), d)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = _fifo(outside / "x.bin")
    if kind == "absolute":
        rewrite_locations(src, str(target))
    elif kind == "dotdot":
        rewrite_locations(src, "../outside/x.bin")
    elif kind == "dotdot_nested":
        rewrite_locations(src, "sub/../../outside/x.bin")
    elif kind == "symlink":
        (d / "link.bin").symlink_to(target)
        rewrite_locations(src, "link.bin")
    else:  # a symlinked folder inside the model folder
        (d / "linkdir").symlink_to(outside, target_is_directory=True)
        rewrite_locations(src, "linkdir/x.bin")
    out = tmp_path / "out.onnx"
    args = ["inspect", src] if command == "inspect" else ["prune", src, "-o", out, "--keep-flops", "0.6"]
    r = gp(*args, timeout=60)
    assert_user_error(r, needle=("escapes", "outside"))
    no_leftovers(tmp_path, "out.onnx")


def test_external_data_symlink_inside_folder(exports, tmp_path):
    """A symlink that stays inside the folder is not an escape; onnx itself refuses symlinked
    external data, so either it loads or it is a clean one-line user error."""
    d = tmp_path / "model"
    src = save_external(exports.get("resnet_basic"), d)
    (d / "alias.bin").symlink_to(d / "w.bin")
    rewrite_locations(src, "alias.bin")
    r = gp("inspect", src)
    if r.returncode == 2:
        line = assert_user_error(r, needle="symbolic link")
        assert "escapes" not in line and "outside" not in line
    else:
        assert r.returncode == 0, r.stderr
        prune_and_verify(src, tmp_path)


@pytest.mark.parametrize("damage", ["missing", "truncated", "truncated_no_length", "empty"])
def test_external_data_missing_or_truncated(exports, tmp_path, damage):
    d = tmp_path / "model"
    src = save_external(exports.get("resnet_basic"), d)
    data = d / "w.bin"
    if damage == "missing":
        data.unlink()
    elif damage == "empty":
        data.write_bytes(b"")
    else:
        if damage == "truncated_no_length":
            m = onnx.load(str(src), load_external_data=False)
            for t in m.graph.initializer:
                kv = [(e.key, e.value) for e in t.external_data if e.key != "length"]
                del t.external_data[:]
                for k, v in kv:
                    t.external_data.add(key=k, value=v)
            onnx.save(m, str(src))
        with open(data, "r+b") as fh:
            fh.truncate(data.stat().st_size - 4)
    out = tmp_path / "out.onnx"
    assert_user_error(gp("inspect", src))
    assert_user_error(gp("prune", src, "-o", out, "--keep-flops", "0.6"))
    no_leftovers(tmp_path, "out.onnx")
