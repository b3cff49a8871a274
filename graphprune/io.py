"""Loading ONNX models safely and writing them atomically."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UserError
from . import log
from .validate import (_PACKED, _all_tensors, _first_line, check_conv_groups, check_graph_names, check_tensor_sizes,
                       refuse_quantized, validate_model)
from .validate import MIN_OPSET, opset_of  # noqa: F401  (re-exported: callers load and ask the opset from one module)
from .rules.base import DEFAULT_DOMAINS as _DEFAULT_DOMAINS

#: protobuf cannot serialize a message of 2 GiB or more; above this size a model is handled with
#: its weights outside the proto (external data files, weight-free skeletons for shape inference)
LARGE_MODEL_BYTES = 2**31 - 2**26
#: tensors at least this large go to the external data file when a model is written with external data
EXTERNAL_MIN_BYTES = 1024
#: offsets of external tensors are aligned to this (lets onnxruntime map the file instead of copying)
_ALIGN = 65536
#: constants at least this large count as weights: shape inference runs on a copy without them, and
#: onnxruntime reads them from graphprune's own arrays (fed as inputs) instead of a serialized copy
WEIGHT_MIN_BYTES = 1 << 16
_SKELETON_LOCATION = "__graphprune_weights_not_loaded__"

def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do two paths name the same file (existing: same inode; otherwise same resolved path)?"""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
        return pa.resolve() == pb.resolve()
    except OSError:
        return False


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


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True, check: bool = True,
               allow_quantized: bool = True, load_external: bool = True) -> onnx.ModelProto:
    """Load and validate an ONNX model; raises UserError with a one-line message on bad input.

    External data is checked (locations inside the model folder, files present and long enough) before
    anything is read. The checker runs on the file, never on a serialized copy of the loaded proto
    (which would double the memory, and fail over 2 GB). ``allow_quantized=False`` refuses quantized
    graphs (prune/inspect). ``load_external=False`` leaves external tensors on disk: the caller reads
    them with :func:`read_external` (``tracer.to_graph(model, base=folder)`` does, one tensor at a time)."""
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
    external = _check_external_data(model, p.parent)
    if 0 < opset_of(model) < MIN_OPSET:  # legacy opsets: upgraded with onnx's version converter
        if not allow_quantized:
            refuse_quantized(model, str(p))
        if external:
            try:
                onnx.load_external_data_for_model(model, str(p.parent))
            except Exception as exc:
                raise UserError(f"{p}: cannot read external data ({_first_line(exc)})") from None
            external = False
        model = upgrade_opset(model, str(p))
        validate_model(model, str(p), check=check)
    else:
        validate_model(model, str(p), check=check, path=p)
    if not allow_quantized:
        refuse_quantized(model, str(p))
    if external and load_external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise UserError(f"{p}: cannot read external data ({_first_line(exc)})") from None
    check_tensor_sizes(model, str(p))
    check_graph_names(model, str(p))
    _unknown_nonpositive_dims(model)
    lift_constant_nodes(model)
    check_conv_groups(model, str(p))
    if infer_shapes:
        model = infer(model)
    return model


#: metadata key recording the opset a model was upgraded from (kept in the output as provenance)
UPGRADED_KEY = "graphprune.opset_upgraded_from"


def _unknown_nonpositive_dims(model: onnx.ModelProto) -> None:
    """Input/output dims written as -1 or 0 (paddle2onnx, hand-edited files) mean "dynamic": make
    them unknown dims, which is what onnxruntime and shape inference understand by that (onnxruntime
    takes a literal 0 as a fixed size of 0)."""
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.ClearField("dim_value")


def upgraded_from(model: onnx.ModelProto) -> int | None:
    """The opset load_model upgraded ``model`` from, or None."""
    for prop in model.metadata_props:
        if prop.key == UPGRADED_KEY:
            try:
                return int(prop.value)
            except ValueError:
                return None
    return None


def upgrade_opset(model: onnx.ModelProto, name: str, target: int = MIN_OPSET) -> onnx.ModelProto:
    """A legacy model (opset 7-10, older ones too) upgraded to ``target`` with
    ``onnx.version_converter``; says so on one line. A failed conversion is a one-line error naming
    the op it stopped at."""
    from onnx import version_converter

    old = opset_of(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserError(f"{name}: fails onnx.checker ({_first_line(exc)})") from None
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:
        msg = _first_line(exc).split(": ")[-1]
        node = _failing_node(model, target)
        where = (f"stopped at {node.op_type} node {node.name!r}: {msg}" if node is not None and node.name
                 else f"stopped at op {node.op_type}: {msg}" if node is not None else msg)
        raise UserError(f"{name}: cannot upgrade opset {old} to {target} with onnx.version_converter "
                        f"({where}); convert the model to opset {target} or newer with its exporter") from None
    upgraded.ir_version = max(upgraded.ir_version, 6)
    del upgraded.metadata_props[:]
    upgraded.metadata_props.extend(p for p in model.metadata_props if p.key != UPGRADED_KEY)
    upgraded.metadata_props.add(key=UPGRADED_KEY, value=str(old))
    log.info(f"{name}: opset {old} upgraded to opset {target} (onnx.version_converter); "
             f"the output is written at opset {target}")
    return upgraded


def _failing_node(model: onnx.ModelProto, target: int):
    """The first node that onnx.version_converter cannot upgrade on its own (None if each can)."""
    from onnx import version_converter

    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:
        typed = model
    g = typed.graph
    types = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    inits = {t.name: t for t in g.initializer}
    for node in model.graph.node:
        def vi(name):
            return types.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

        ins = [n for n in node.input if n]
        one = onnx.helper.make_graph([node], "one", [vi(n) for n in ins if n not in inits],
                                     [vi(n) for n in node.output if n], [inits[n] for n in ins if n in inits])
        m = onnx.helper.make_model(one, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            version_converter.convert_version(m, target)
        except Exception:
            return node
    return None


def read_external(tensor: onnx.TensorProto, base: str | os.PathLike, name: str = "model", *,
                  is_weight: bool = False) -> np.ndarray:
    """The values of an external-data tensor, read straight from its file into a new array (the
    proto never holds them). Locations were checked by load_model; sizes and NaN are checked here."""
    from .validate import _FLOATS, _check_finite

    entries = {e.key: e.value for e in tensor.external_data}
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception:
        raise UserError(f"{name}: tensor {tensor.name!r} has an unknown data type {tensor.data_type}") from None
    if tensor.data_type in _PACKED or dtype.kind in "OUS":
        return numpy_helper.to_array(tensor, base_dir=str(base))
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    offset, length = int(entries.get("offset", 0) or 0), entries.get("length")
    if length is not None and int(length) != count * dtype.itemsize:
        raise UserError(f"{name}: tensor {tensor.name!r} holds {length} bytes of external data, its shape "
                        f"{list(tensor.dims)} needs {count * dtype.itemsize}")
    path = Path(base) / entries["location"]
    if offset + count * dtype.itemsize > path.stat().st_size:
        raise UserError(f"{name}: external data file {entries['location']!r} is truncated (tensor {tensor.name!r})")
    values = np.fromfile(path, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    if not dtype.isnative:
        values = values.astype(dtype)
    if tensor.data_type in _FLOATS:
        _check_finite(values, tensor.name, is_weight, name)
    return values.reshape(tuple(tensor.dims))


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size estimate that works above 2 GB (summed per initializer and node)."""
    g = model.graph
    return (sum(_initializer_bytes(t) for t in g.initializer) + sum(n.ByteSize() for n in g.node)
            + sum(v.ByteSize() for v in [*g.input, *g.output, *g.value_info]))


def _initializer_bytes(t: onnx.TensorProto) -> int:
    """Size of an initializer in the proto, from its dims where possible (ByteSize encodes: slow)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 64 + len(t.name)
    if t.HasField("raw_data") and t.data_type not in _PACKED and t.data_type != onnx.TensorProto.STRING:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            return int(np.prod(t.dims, dtype=np.int64)) * itemsize + 64 + len(t.name)
        except Exception:
            pass
    return t.ByteSize()


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their dims (external ones included, none read)."""
    total = 0
    for t in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            continue
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def is_large(model: onnx.ModelProto) -> bool:
    return model_bytes(model) > LARGE_MODEL_BYTES


#: above this size the checker and onnxruntime get a model as files written with external data
#: (streamed one tensor at a time) instead of one serialized copy in memory (plus the parser's)
FILE_ROUTE_BYTES = 1 << 26


def use_files(model: onnx.ModelProto) -> bool:
    """Hand ``model`` to the checker / onnxruntime as files rather than serialized bytes?"""
    return model_bytes(model) > min(LARGE_MODEL_BYTES, FILE_ROUTE_BYTES)


def _copy_fields(src, dst, skip=()) -> None:
    """Copy the set fields of one protobuf message into another, except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if getattr(fd, "is_repeated", None) if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def externalized(model: onnx.ModelProto, location: str = _SKELETON_LOCATION, write=None,
                 threshold: int = EXTERNAL_MIN_BYTES) -> onnx.ModelProto:
    """A new ModelProto in which every main-graph initializer holding ``threshold`` bytes or more of
    raw data refers to external data at ``location`` instead. ``write(data) -> offset`` stores each
    tensor's bytes (one tensor at a time: memory stays bounded); with ``write=None`` nothing is
    stored and the result is a weight-free skeleton, enough for shape inference. ``model`` is not changed."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or _initializer_bytes(t) < threshold:
            out.graph.initializer.add().CopyFrom(t)
            continue
        nt = out.graph.initializer.add()
        _copy_fields(t, nt, skip=("raw_data", "external_data", "data_location"))
        nt.data_location = onnx.TensorProto.EXTERNAL
        entries = [("location", location)]
        if write is not None:
            data = t.raw_data
            entries += [("offset", str(write(data))), ("length", str(len(data)))]
            del data
        for key, value in entries:
            e = nt.external_data.add()
            e.key, e.value = key, value
    return out


def write_model_files(model: onnx.ModelProto, model_path: str | os.PathLike, data_path: str | os.PathLike,
                      location: str) -> None:
    """Write ``model`` to ``model_path`` with its large initializers streamed into ``data_path``,
    referenced from the model as ``location`` (a name relative to the model's folder)."""
    with open(data_path, "wb") as fh:
        def write(data: bytes) -> int:
            pos = fh.tell()
            if pos % _ALIGN:
                fh.write(b"\0" * (_ALIGN - pos % _ALIGN))
                pos = fh.tell()
            fh.write(data)
            return pos

        skeleton = externalized(model, location, write)
    with open(model_path, "wb") as fh:
        fh.write(skeleton.SerializeToString())


def _graft_shapes(model: onnx.ModelProto, inferred: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    for dst, src in zip(model.graph.output, inferred.graph.output):
        dst.CopyFrom(src)
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for dst, src in zip(model.graph.node, inferred.graph.node):  # shapes inferred inside If/Loop/Scan bodies
        if any(a.type in subgraph for a in dst.attribute):
            dst.CopyFrom(src)
    return model


def infer_shapes(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes on a copy without the weights (constants of WEIGHT_MIN_BYTES
    or more); the shapes are copied into ``model``, which is then returned. Works above 2 GB and never
    copies the weights. Errors propagate."""
    if not any(t.HasField("raw_data") and _initializer_bytes(t) >= WEIGHT_MIN_BYTES for t in model.graph.initializer):
        return onnx.shape_inference.infer_shapes(model, data_prop=data_prop)  # nothing worth leaving out
    skeleton = externalized(model, threshold=WEIGHT_MIN_BYTES)
    return _graft_shapes(model, onnx.shape_inference.infer_shapes(skeleton, data_prop=data_prop))


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference (data propagation on); the model is returned unchanged on failure."""
    try:
        return infer_shapes(model, data_prop=True)
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
    """Full checker (strict shape inference) on a model graphprune produced; failure is a bug.
    Large models are checked from a temporary copy written with external data (see use_files)."""
    if not use_files(model):
        onnx.checker.check_model(model, full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-check-") as d:
        path = os.path.join(d, "model.onnx")
        write_model_files(model, path, path + ".data", "model.onnx.data")
        onnx.checker.check_model(path, full_check=True)


def external_files(path: str | os.PathLike) -> set[Path]:
    """Resolved paths of the external data files a model file refers to (none read)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    base = Path(path).parent
    out = set()
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc:
                out.add((base / loc).resolve())
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_key(message, field: str) -> bytes:
    """Protobuf key of a length-delimited field (wire type 2)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _split_at(message, field: str):
    """Two copies of ``message`` without ``field``: the fields numbered below it, and those above."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    before, after = type(message)(), type(message)()
    _copy_fields(message, before, skip=tuple(f.name for f in message.DESCRIPTOR.fields if f.number >= number))
    _copy_fields(message, after, skip=tuple(f.name for f in message.DESCRIPTOR.fields if f.number <= number))
    return before.SerializeToString(), after.SerializeToString()


def write_serialized(model: onnx.ModelProto, fh) -> None:
    """Write ``model`` as the bytes ``model.SerializeToString()`` gives (fields in number order), one
    initializer at a time, so memory holds one tensor's bytes, not the whole model's."""
    model_head, model_tail = _split_at(model, "graph")
    graph_head, graph_tail = _split_at(model.graph, "initializer")
    key = _field_key(model.graph, "initializer")
    sizes = [t.ByteSize() for t in model.graph.initializer]
    length = len(graph_head) + len(graph_tail) + sum(len(key) + len(_varint(n)) + n for n in sizes)
    fh.write(model_head)
    fh.write(_field_key(model, "graph") + _varint(length) + graph_head)
    for tensor, size in zip(model.graph.initializer, sizes):
        data = tensor.SerializeToString()
        assert len(data) == size
        fh.write(key + _varint(size) + data)
    fh.write(graph_tail)
    fh.write(model_tail)


def _default_mode(fd: int) -> None:
    """mkstemp creates 0600 files; give the output the permissions a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except (AttributeError, OSError):  # not supported on this platform / filesystem
        pass


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, src: str | os.PathLike | None = None,
               force: bool = False, external_data: bool | None = None) -> None:
    """Write atomically: temp file in the target folder, then rename.

    With external data (``external_data=True``, or automatically for models over 2 GB) the weights go
    to ``OUT.data`` beside ``OUT``: both are written under temporary names and renamed only when both
    are complete; on any failure (Ctrl-C included) neither temporary file remains."""
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
    if external_data is None:
        external_data = is_large(model)
    if external_data:
        _save_external(model, out, folder, src=src, force=force)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as fh:
            write_serialized(model, fh)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done; it is raised right after. Main thread only
    (where Python delivers signals); elsewhere the block simply runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _save_external(model: onnx.ModelProto, out: Path, folder: Path, *, src=None, force: bool = False) -> None:
    data = out.with_name(out.name + ".data")
    if data.is_dir():
        raise UserError(f"{data}: is a directory (the external data file of {out.name})")
    if src is not None and data.resolve() in external_files(src) | {Path(src).resolve()}:
        raise UserError(f"{data}: is a file of the input model; choose another output name")
    if data.exists() and not force:
        raise UserError(f"{data}: exists (use --force to overwrite)")
    tmps: list[str] = []
    try:
        fd_m, tmp_m = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        tmps.append(tmp_m)
        fd_d, tmp_d = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp", dir=folder)
        tmps.append(tmp_d)
        for fd in (fd_m, fd_d):
            _default_mode(fd)
            os.close(fd)
        write_model_files(model, tmp_m, tmp_d, data.name)
        with _interrupt_deferred():  # never a new OUT.data beside the old OUT (or the reverse)
            os.replace(tmp_d, data)
            os.replace(tmp_m, out)
    except BaseException:
        for tmp in tmps:
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
