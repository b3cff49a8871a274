"""Mutation fuzzing of `graphprune prune`: every broken model either prunes to a verified model (exit 0)
or is refused with exactly one error line (exit 2); never a traceback, never a file left behind.

The loop is deterministic (seeded numpy RNG): a failing case is reproduced by its printed label."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphprune import cli

ROOT = Path(__file__).resolve().parent.parent
SEED_MODELS = ("samples/digits_resnet.onnx", "samples/digits_mobilenet_v2.onnx")
N_INPROCESS = 300
N_SUBPROCESS = 12
PRUNE_ARGS = ("--keep-channels", "0.5", "--seed", "0")


# ---------------------------------------------------------------------------------------- mutations

def _truncate(data: bytes, model: onnx.ModelProto, rng) -> tuple[str, bytes]:
    cut = int(rng.integers(0, len(data)))
    return f"truncate@{cut}", data[:cut]


def _flip(data: bytes, model, rng):
    buf = bytearray(data)
    n = int(rng.integers(1, 21))
    where = rng.integers(0, len(buf), n)
    for i in where:
        buf[i] ^= int(rng.integers(1, 256))
    return f"flip{n}", bytes(buf)


def _pick(rng, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _delete_initializer(data, model, rng):
    inits = model.graph.initializer
    k = int(rng.integers(0, len(inits)))
    name = inits[k].name
    del inits[k]
    return f"del-init:{name}", model.SerializeToString()


def _initializer_dims(data, model, rng):
    t = _pick(rng, [t for t in model.graph.initializer if len(t.dims)])
    axis = int(rng.integers(0, len(t.dims)))
    t.dims[axis] = max(0, t.dims[axis] + int(_pick(rng, [-1, 1, 2, -t.dims[axis]])))
    return f"dims:{t.name}[{axis}]={t.dims[axis]}", model.SerializeToString()


def _raw_length(data, model, rng):
    t = _pick(rng, [t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) > 4])
    raw = t.raw_data
    t.raw_data = raw[:-int(rng.integers(1, 5))] if rng.random() < 0.5 else raw + b"\0" * int(rng.integers(1, 9))
    return f"raw-len:{t.name}", model.SerializeToString()


def _graph_input(data, model, rng):
    inits = {t.name for t in model.graph.initializer}
    real = [i for i, v in enumerate(model.graph.input) if v.name not in inits]
    k = _pick(rng, real)
    what = _pick(rng, ["rename", "delete", "dims", "dtype"])
    vi = model.graph.input[k]
    if what == "rename":
        vi.name = vi.name + "_renamed"
    elif what == "delete":
        del model.graph.input[k]
    elif what == "dims":
        dims = vi.type.tensor_type.shape.dim
        axis = int(rng.integers(0, len(dims)))
        dims[axis].Clear()
        dims[axis].dim_value = int(_pick(rng, [0, 2, 5, 64]))
    else:
        vi.type.tensor_type.elem_type = int(_pick(rng, [onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE,
                                                        onnx.TensorProto.STRING]))
    return f"input-{what}:{vi.name}", model.SerializeToString()


def _node_input(data, model, rng):
    node = _pick(rng, [n for n in model.graph.node if len(n.input)])
    k = int(rng.integers(0, len(node.input)))
    choice = _pick(rng, ["missing", "other", "empty"])
    if choice == "missing":
        node.input[k] = "no_such_tensor"
    elif choice == "other":  # an existing tensor, possibly of the wrong shape or produced later
        node.input[k] = _pick(rng, [o for n in model.graph.node for o in n.output])
    else:
        node.input[k] = ""
    return f"node-input-{choice}:{node.name}[{k}]", model.SerializeToString()


def _dup_output(data, model, rng):
    nodes = model.graph.node
    i, j = rng.choice(len(nodes), 2, replace=False)
    nodes[int(j)].output[0] = nodes[int(i)].output[0]
    return f"dup-output:{nodes[int(j)].name}", model.SerializeToString()


def _opset(data, model, rng):
    v = int(_pick(rng, [1, 7, 9, 10, 11, 13, 17, onnx.defs.onnx_opset_version() + 1, 99]))
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = v
    return f"opset:{v}", model.SerializeToString()


def _attribute(data, model, rng):
    node = _pick(rng, [n for n in model.graph.node if len(n.attribute)])
    attr = _pick(rng, list(node.attribute))
    if attr.type == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, [0, -1, 2, 3, 1000]))
    elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
        attr.ints[int(rng.integers(0, len(attr.ints)))] = int(_pick(rng, [0, -1, 2, 7]))
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, [0.0, -1.0, float("nan")]))
    else:
        node.attribute.remove(attr)
    return f"attr:{node.name}.{attr.name}", model.SerializeToString()


def _swap_nodes(data, model, rng):
    nodes = model.graph.node
    i, j = sorted(int(k) for k in rng.choice(len(nodes), 2, replace=False))
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(nodes[i])
    b.CopyFrom(nodes[j])
    nodes[i].CopyFrom(b)
    nodes[j].CopyFrom(a)
    return f"swap:{i},{j}", model.SerializeToString()


def _values(data, model, rng):
    """Weights turned to NaN/Inf/zero: a model that is valid, but numerically odd."""
    t = _pick(rng, [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.raw_data])
    arr = onnx.numpy_helper.to_array(t).copy()
    arr.flat[:max(1, arr.size // 4)] = _pick(rng, [np.nan, np.inf, 0.0])
    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    return f"values:{t.name}", model.SerializeToString()


MUTATIONS = (_truncate, _flip, _delete_initializer, _initializer_dims, _raw_length, _graph_input, _node_input,
             _dup_output, _opset, _attribute, _swap_nodes, _values, _flip, _truncate)


def cases(n: int, seed: int, sources: list[Path]):
    """Deterministic list of (label, bytes)."""
    rng = np.random.default_rng(seed)
    blobs = {p: p.read_bytes() for p in sources}
    out = []
    for k in range(n):
        src = sources[k % len(sources)]
        fn = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
        model = onnx.load_from_string(blobs[src])
        label, data = fn(blobs[src], model, rng)
        out.append((f"{k}:{src.stem}:{label}", data))
    return out


# ------------------------------------------------------------------------------------------ checks

def _check_outcome(label: str, rc: int, err: str, folder: Path, out: Path) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, f"{label}: traceback\n{err}"
    left = sorted(p.name for p in folder.iterdir())
    if rc == 0:
        assert left == [out.name], f"{label}: files after success: {left}"
        onnx.checker.check_model(str(out), full_check=True)
        out.unlink()
        return "ok"
    assert rc == 2, f"{label}: exit {rc}\n{err}"
    errors = [ln for ln in lines if not ln.startswith("graphprune: warning:")]
    assert len(errors) == 1 and errors[0].startswith("graphprune: error: "), f"{label}: stderr\n{err}"
    assert left == [], f"{label}: files left behind: {left}"
    return "refused"


def _run_inprocess(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def sources(zoo_model):
    return [ROOT / p for p in SEED_MODELS] + [Path(zoo_model("mixed_ops", "torchscript"))]


def test_fuzz_inprocess(tmp_path, sources):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    outcomes: dict[str, int] = {}
    for k, (label, data) in enumerate(cases(N_INPROCESS, 1234, sources)):
        src = src_dir / f"case{k}.onnx"
        src.write_bytes(data)
        out = out_dir / "pruned.onnx"
        rc, err = _run_inprocess(["-q", "prune", src, "-o", out, *PRUNE_ARGS])
        kind = _check_outcome(label, rc, err, out_dir, out)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        src.unlink()
    print("outcomes:", outcomes)
    assert sum(outcomes.values()) == N_INPROCESS
    assert outcomes.get("refused", 0) > N_INPROCESS // 3  # the mutations do break models
    assert outcomes.get("ok", 0) > 0  # ... and harmless ones still prune


def test_fuzz_inspect_inprocess(tmp_path, sources):
    """inspect on mutated models: exit 0 or one error line."""
    for k, (label, data) in enumerate(cases(60, 99, sources)):
        src = tmp_path / f"case{k}.onnx"
        src.write_bytes(data)
        rc, err = _run_inprocess(["-q", "inspect", "--json", src])
        assert "Traceback" not in err, f"{label}: traceback\n{err}"
        assert rc in (0, 2), f"{label}: exit {rc}\n{err}"
        if rc == 2:
            errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("graphprune: warning:")]
            assert len(errors) == 1, f"{label}: stderr\n{err}"
        src.unlink()


def test_fuzz_subprocess(tmp_path, sources):
    """A few dozen cases through the real command: the whole stderr is one line on refusal."""
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    procs = []
    for k, (label, data) in enumerate(cases(N_SUBPROCESS, 777, sources)):
        src = src_dir / f"case{k}.onnx"
        src.write_bytes(data)
        case_out = out_dir / f"c{k}"
        case_out.mkdir()
        procs.append((label, case_out, subprocess.Popen(
            [sys.executable, "-m", "graphprune.cli", "-q", "prune", str(src), "-o", str(case_out / "pruned.onnx"),
             *PRUNE_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "GRAPHPRUNE_QUIET": "1"})))
        if len(procs) >= 4 or k == N_SUBPROCESS - 1:  # a few at a time
            for label_, folder, p in procs:
                _, err = p.communicate(timeout=300)
                _check_outcome(label_, p.returncode, err, folder, folder / "pruned.onnx")
                if p.returncode == 2:
                    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, f"{label_}: stderr\n{err}"
            procs = []
