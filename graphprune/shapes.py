"""Concrete input sizes for models with dynamic dimensions.

Exported detectors, OCR models and transformers declare height, width or sequence length as
symbolic (``'height'``, ``'p2o.DynamicDimension.1'``, ``'unk__3'``), as ``-1`` or as ``0``. MACs,
latency tables, parity checks and accuracy need one real size: ``--input-shape`` gives it, else the
calibration arrays' shapes, else the model's own static dims. The written model keeps its symbolic
dims; only the analysis runs at the concrete size.

A resolved size is ``{input name: (dims...)}`` with the batch axis at 1 when it is dynamic. It is
what every stage that runs or counts the model is given (``random_inputs(..., shapes=)``,
``trace(..., input_shapes=)``).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from .errors import UserError

#: one input of at most this many bytes at batch 1 (a dimension of 10**9 is a typo, not a size)
MAX_INPUT_BYTES = 1 << 31
_FLAG = "--input-shape"
_NAMED = re.compile(r"^(?P<name>.+?):(?P<dims>[\s\d,()\[\]x-]+)$")

Shapes = dict[str, tuple[int, ...]]


def _dim(d) -> int | str | None:
    """A declared dimension: positive int, the symbol (str), or None (missing, -1, 0, negative)."""
    if d.HasField("dim_value"):
        return int(d.dim_value) if d.dim_value > 0 else None
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


def declared_inputs(model) -> list[tuple[str, list | None, int]]:
    """(name, dims, elem_type) of each real graph input of a ModelProto (or an onnx-graphsurgeon
    graph); dims is None when the input has no shape, else a list of positive ints, symbol names
    (str) or None (unknown, -1 or 0)."""
    if not hasattr(model, "graph") and hasattr(model, "inputs"):  # gs.Graph
        out = []
        for t in model.inputs:
            dims = None if t.shape is None else [
                int(d) if isinstance(d, (int, np.integer)) and d > 0 else (d if isinstance(d, str) and d else None)
                for d in t.shape]
            try:
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            except Exception:
                elem = onnx.TensorProto.FLOAT
            out.append((t.name, dims, elem))
        return out
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [_dim(d) for d in tt.shape.dim] if tt.HasField("shape") else None
        out.append((vi.name, dims, tt.elem_type))
    return out


def _show(dims) -> str:
    if dims is None:
        return "no shape"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def parse_dims(text: str, what: str = _FLAG) -> tuple[int, ...]:
    """``"1,3,640,640"`` (also ``1x3x640x640``, brackets allowed) -> positive ints; one-line errors."""
    body = str(text).strip().strip("()[]")
    parts = [p.strip() for p in re.split(r"[,x]", body)]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated positive integers like 1,3,640,640") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"{what} {text!r}: every dimension must be a positive integer")
    return dims


def parse_specs(specs: Iterable[str] | None, names: Sequence[str]) -> Shapes:
    """``--input-shape`` values (``1,3,640,640`` for a single-input model, ``NAME:1,3,640,640`` for
    any input, repeatable) -> {input name: dims}."""
    out: Shapes = {}
    for spec in specs or []:
        spec = str(spec).strip()
        m = _NAMED.match(spec)
        if m and m.group("name") in names:
            name, dims = m.group("name"), parse_dims(m.group("dims"))
        elif m and ":" in spec and not spec.split(":")[0].strip().lstrip("-").isdigit():
            raise UserError(f"{_FLAG} {spec!r}: the model has no input {m.group('name')!r} "
                            f"(inputs: {', '.join(names)})")
        else:
            if len(names) != 1:
                raise UserError(f"{_FLAG} {spec!r}: the model has {len(names)} inputs ({', '.join(names)}); "
                                f"name one per flag, e.g. {_FLAG} {names[0] if names else 'NAME'}:1,3,224,224")
            name, dims = names[0], parse_dims(spec)
        if name in out:
            raise UserError(f"{_FLAG} given twice for input {name!r}")
        out[name] = dims
    return out


def _from_calib(path: str, names: Sequence[str]) -> Shapes:
    from .calib import load_npz

    arrays = {k: v for k, v in load_npz(path).items() if k != "labels"}
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    return {n: (1, *arrays[n].shape[1:]) for n in names if n in arrays and arrays[n].ndim >= 1}


def resolve(model: onnx.ModelProto, specs: Iterable[str] | Mapping[str, Sequence[int]] | None = None,
            calib: str | None = None, hint: Mapping[str, Sequence[int]] | None = None) -> Shapes:
    """The concrete size (batch 1 where the batch is dynamic) of every real input of ``model``.

    ``specs``: ``--input-shape`` strings, or a mapping {name: dims}. ``calib``: an .npz whose arrays'
    shapes (batch aside) serve for inputs ``specs`` does not name. A non-batch dimension that is
    symbolic, -1, 0 or missing with neither is a one-line error naming the input, its dims and the flag.
    ``hint`` (e.g. the size a report records) serves last, for inputs it names with a fitting rank."""
    declared = declared_inputs(model)
    names = [n for n, _, _ in declared]
    if isinstance(specs, Mapping):
        given = {str(k): tuple(int(d) for d in v) for k, v in specs.items()}
        for k, v in given.items():
            if k not in names:
                raise UserError(f"{_FLAG}: the model has no input {k!r} (inputs: {', '.join(names)})")
            if not v or any(d <= 0 for d in v):
                raise UserError(f"{_FLAG} for {k!r}: every dimension must be a positive integer, got {list(v)}")
    else:
        given = parse_specs(specs, names)
    from_calib = _from_calib(calib, names) if calib else {}
    out: Shapes = {}
    for name, dims, elem in declared:
        if name in given:
            shape, origin = given[name], _FLAG
        elif name in from_calib:
            shape, origin = from_calib[name], f"--calib {calib}"
        elif hint and name in hint and _fits(hint[name], dims):
            shape, origin = tuple(int(d) for d in hint[name]), "the report's input size"
        else:
            shape, origin = None, None
        if shape is not None:
            if dims is not None and len(shape) != len(dims):
                raise UserError(f"{origin}: shape {list(shape)} does not fit input {name!r}: it has rank "
                                f"{len(dims)} {_show(dims)}")
            for axis, (want, have) in enumerate(zip(shape, dims or [])):
                if isinstance(have, int) and want != have and not (axis == 0 and origin != _FLAG):
                    raise UserError(f"{origin}: shape {list(shape)} does not fit input {name!r} {_show(dims)}: "
                                    f"dimension {axis} is fixed at {have}, got {want}")
            shape = tuple(int(d) for d in shape)
            if dims and not isinstance(dims[0], int):  # costs and the checks' first size are at batch 1
                shape = (1, *shape[1:])
        else:
            if dims is None:
                raise UserError(f"input {name!r} declares no shape; give its size with {_FLAG} "
                                f"{name}:1,3,224,224 (or calibration data with --calib)")
            bad = [axis for axis, d in enumerate(dims) if axis > 0 and not isinstance(d, int)]
            if bad:
                raise UserError(f"input {name!r} has dims {_show(dims)}: dimension {bad[0]} is dynamic; give the "
                                f"size to use with {_FLAG} (e.g. {_FLAG} "
                                f"{_example(name, dims, len(declared) > 1)}) or calibration data with --calib")
            shape = tuple(d if isinstance(d, int) else 1 for d in dims)
        _check_size(name, shape, elem)
        out[name] = shape
    return out


def _fits(shape, dims) -> bool:
    try:
        shape = [int(d) for d in shape]
    except (TypeError, ValueError):
        return False
    if dims is None:
        return bool(shape) and all(d > 0 for d in shape)
    return len(shape) == len(dims) and all(d > 0 and (not isinstance(h, int) or h == d or a == 0)
                                           for a, (d, h) in enumerate(zip(shape, dims)))


def _example(name: str, dims: list, named: bool) -> str:
    filled = ",".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "N") for i, d in enumerate(dims))
    return f"{name}:{filled}" if named else filled


def _check_size(name: str, shape: tuple[int, ...], elem: int) -> None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
    except Exception:
        itemsize = 4
    nbytes = float(np.prod([float(d) for d in shape])) * itemsize
    if nbytes > MAX_INPUT_BYTES:
        raise UserError(f"input {name!r} of size {list(shape)} would take {nbytes / 2**30:.3g} GiB per sample "
                        f"(more than {MAX_INPUT_BYTES / 2**30:.0f} GiB); give a realistic size with {_FLAG}")


def dynamic_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Non-batch axes each input declares dynamic (symbolic, -1 or 0)."""
    return {name: [a for a, d in enumerate(dims) if a > 0 and not isinstance(d, int)]
            for name, dims, _ in declared_inputs(model) if dims is not None}


def with_batch(shapes: Mapping[str, Sequence[int]], model: onnx.ModelProto, batch: int) -> Shapes:
    """``shapes`` with the batch axis set to ``batch`` on inputs whose batch is dynamic."""
    dyn = {name: dims is None or not dims or not isinstance(dims[0], int) for name, dims, _ in declared_inputs(model)}
    return {n: ((batch, *s[1:]) if s and dyn.get(n, True) else tuple(s)) for n, s in shapes.items()}


def stride_of(shapes: Mapping[str, Sequence[int]], static: Mapping[str, Sequence], name: str, axis: int) -> int:
    """The model's stride along a spatial input axis: the largest power of two dividing the input size
    that is at most the ratio between the input size and the smallest feature map of the same rank
    (global pools aside). 1 when nothing is downsampled."""
    size = int(shapes[name][axis])
    rank = len(shapes[name])
    smallest = size
    for dims in static.values():
        if dims is None or len(dims) != rank or axis >= len(dims):
            continue
        d = dims[axis]
        if isinstance(d, int) and 1 < d < smallest:
            smallest = d
    ratio = max(1, size // max(smallest, 1))
    s = 1
    while s * 2 <= ratio and size % (s * 2) == 0:
        s *= 2
    return s


def second_size(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], static: Mapping[str, Sequence]) -> Shapes | None:
    """Another valid size for the parity check of a model with dynamic non-batch dims: each dynamic
    axis moves by the model's stride along it (down when that keeps at least two strides, else up).
    None when the model has no dynamic non-batch dims."""
    dyn = dynamic_axes(model)
    if not any(dyn.values()):
        return None
    out: Shapes = {}
    for name, shape in shapes.items():
        new = list(shape)
        for axis in dyn.get(name, []):
            s = stride_of(shapes, static, name, axis)
            new[axis] = shape[axis] - s if shape[axis] - s >= 2 * s else shape[axis] + s
        out[name] = tuple(new)
    return out


def text(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{"x": (1, 3, 640, 640)}`` -> ``"x 1x3x640x640"`` (for messages and summaries)."""
    return ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items()) or "no inputs"


def describe(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """JSON form for reports."""
    return {n: [int(d) for d in s] for n, s in shapes.items()}
