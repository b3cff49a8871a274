"""Loading ONNX models safely and writing them atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UserError
from . import log

MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _check_external_data(model: onnx.ModelProto, base: Path) -> bool:
    """Reject external-data locations that escape the model folder. Returns True if any exist."""
    base = base.resolve()
    found = False
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        entries = {e.key: e.value for e in tensor.external_data}
        loc = entries.get("location", "")
        if not loc or os.path.isabs(loc) or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise UserError(f"external data location {loc!r} of tensor {tensor.name!r} escapes the model folder")
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise UserError(f"external data location {loc!r} of tensor {tensor.name!r} resolves outside the model folder")
        if not target.is_file():
            raise UserError(f"external data file {loc!r} of tensor {tensor.name!r} is missing")
        offset = int(entries.get("offset", 0) or 0)
        length = entries.get("length")
        if length is not None and offset + int(length) > target.stat().st_size:
            raise UserError(f"external data file {loc!r} is truncated (tensor {tensor.name!r})")
    return found


def _all_tensors(model: onnx.ModelProto):
    yield from onnx.external_data_helper._get_all_tensors(model)


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX model; raises UserError with a one-line message on bad input."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserError(f"{p}: not a valid ONNX file ({_first_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{p}: parsed, but holds no ONNX graph (is it really an .onnx model?)")
    if _check_external_data(model, p.parent):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise UserError(f"{p}: cannot read external data ({_first_line(exc)})") from None
    validate_model(model, str(p), check=check)
    lift_constant_nodes(model)
    if infer_shapes:
        model = infer(model)
    return model


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return imp.version
    return 0


def validate_model(model: onnx.ModelProto, name: str, *, check: bool = True) -> None:
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{name}: opset {opset} is not supported (graphprune supports {MIN_OPSET}..{MAX_OPSET})")
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise UserError(f"{name}: fails onnx.checker ({_first_line(exc)})") from None


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference (data propagation on); the model is returned unchanged on failure."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.warn(f"shape inference failed ({_first_line(exc)}); rules needing shapes will freeze")
        return model


def lift_constant_nodes(model: onnx.ModelProto) -> None:
    """Turn main-graph Constant nodes into initializers so every constant is a gs.Constant.

    Also folds ``CastLike(constant, t)`` where t's element type is known: the dynamo exporter
    (without optimisation) builds conv biases as ``Expand(CastLike(0, input), Shape(W))``, which
    constant folding cannot evaluate because ``t`` (often the graph input) is not a constant."""
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    elem.update((t.name, t.data_type) for t in graph.initializer)
    keep = []
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            keep.append(node)
            continue
        if node.op_type == "Constant" and len(node.attribute) == 1:
            arr = _constant_value(node.attribute[0])
            if arr is not None:
                tensor = numpy_helper.from_array(arr, node.output[0])
                graph.initializer.append(tensor)
                consts[tensor.name], elem[tensor.name] = tensor, tensor.data_type
                continue
        if (node.op_type == "CastLike" and len(node.input) == 2 and node.input[0] in consts
                and elem.get(node.input[1]) and len(node.output) == 1):
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem[node.input[1]])
                arr = numpy_helper.to_array(consts[node.input[0]]).astype(dtype)
            except Exception:  # unusual types (strings, float8, ...): leave the node alone
                arr = None
            if arr is not None:
                tensor = numpy_helper.from_array(arr, node.output[0])
                graph.initializer.append(tensor)
                consts[tensor.name], elem[tensor.name] = tensor, tensor.data_type
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _constant_value(attr: onnx.AttributeProto):
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    return None


def check_output(model: onnx.ModelProto) -> None:
    """Full checker (strict shape inference) on a model graphprune produced; failure is a bug."""
    onnx.checker.check_model(model, full_check=True)


def _default_mode(fd: int) -> None:
    """mkstemp creates 0600 files; give the output the permissions a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except (AttributeError, OSError):  # not supported on this platform / filesystem
        pass


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, src: str | os.PathLike | None = None,
               force: bool = False) -> None:
    """Write atomically: temp file in the target folder, then rename."""
    out = Path(path)
    if src is not None and out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
        raise UserError(f"{out}: refusing to overwrite the input model")
    if out.exists() and not force:
        raise UserError(f"{out}: exists (use --force to overwrite)")
    if out.is_dir():
        raise UserError(f"{out}: is a directory")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{folder}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    import json

    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{folder}: report folder does not exist")
    if out.is_dir():
        raise UserError(f"{out}: is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    try:
        _default_mode(fd)
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
