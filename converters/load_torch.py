"""Load a PyTorch model from what a user names on the command line, and convert it to ONNX.

Sources (``load_source``):

* ``path/to/file.py:factory`` -- the file is imported by path (only because the user named it),
  ``factory()`` must return an ``nn.Module``; ``weights`` (a state dict file) is then loaded with
  ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``.
* ``model.pt`` / ``.pth`` / ``.ts`` / ``.torchscript`` -- a TorchScript archive (``torch.jit.load``).
* ``program.pt2`` -- a ``torch.export`` ExportedProgram (``torch.export.load``).

Nothing is downloaded and no pickle that holds more than tensors and containers is executed.
Every failure is a :class:`SourceError` (a :class:`ConversionError`) with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from graphprune.io import same_file as _same_file

from .torch_to_onnx import (
    EXPORTERS,
    ConversionError,
    _one_line,
    _quiet,
    export_module,
    program_example_inputs,
    program_input_shapes,
)

__all__ = ["SourceError", "load_source", "load_weights", "parse_input_shape", "convert", "summarize",
           "TORCHSCRIPT_SUFFIXES", "PROGRAM_SUFFIXES"]

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
PROGRAM_SUFFIXES = (".pt2",)
_SPEC_HELP = ("expected file.py:factory, a TorchScript file (.pt, .pth, .ts, .torchscript) "
              "or a torch.export program (.pt2)")
_FACTORY = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")


class SourceError(ConversionError):
    """The named source (factory file, TorchScript archive, .pt2, weights) cannot be loaded."""


# --------------------------------------------------------------------------- parsing helpers
def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; every dim a positive integer."""
    parts = [p.strip() for p in str(text).strip().strip("()[]").split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:  # tolerate a trailing comma: "8,"
        parts = parts[:-1]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise SourceError(f"bad input shape {text!r}: expected comma-separated positive integers like 1,3,224,224")
    return dims


def _split_spec(spec: str) -> tuple[str, str | None]:
    m = _FACTORY.match(spec)
    if m:
        return m.group("file"), m.group("attr")
    return spec, None


def source_kind(spec: str) -> str:
    """``"factory"``, ``"torchscript"`` or ``"program"`` from the spelling of ``spec`` (no file access)."""
    path, attr = _split_spec(spec)
    if attr is not None:
        return "factory"
    suffix = Path(path).suffix.lower()
    if suffix == ".py":
        raise SourceError(f"{spec}: name the factory function too, as {spec}:FACTORY")
    if suffix in PROGRAM_SUFFIXES:
        return "program"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if suffix == ".onnx":
        raise SourceError(f"{spec}: is already an ONNX model, nothing to convert")
    if ":" in spec:
        raise SourceError(f"{spec}: bad source; {_SPEC_HELP}")
    raise SourceError(f"{spec}: cannot tell what this is from its name; {_SPEC_HELP}")


def source_path(spec: str) -> str:
    """The file a source spec names (for the 'refuse to overwrite the input' check)."""
    return _split_spec(spec)[0]


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file")
    if p.is_dir():
        raise SourceError(f"{path}: is a directory, expected {what}")
    return p


# --------------------------------------------------------------------------- factory files
@contextlib.contextmanager
def _on_sys_path(folder: str):
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass


def _import_file(path: Path):
    real = path.resolve()
    digest = hashlib.sha1(str(real).encode()).hexdigest()[:12]
    name = f"_graphprune_src_{re.sub(r'[^0-9A-Za-z_]', '_', real.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, real)
    if spec is None or spec.loader is None:
        raise SourceError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of user code is reported
        sys.modules.pop(name, None)
        raise SourceError(f"{path}: import failed: {_one_line(exc)}") from None
    return module


def _load_factory(file: str, attr: str) -> nn.Module:
    p = _existing_file(file, "a Python file")
    if p.suffix != ".py":
        raise SourceError(f"{file}: not a .py file")
    folder = str(p.resolve().parent)
    with _on_sys_path(folder):
        module = _import_file(p)
        if not hasattr(module, attr):
            public = sorted(n for n, v in vars(module).items()
                            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
            hint = f" (callables defined there: {', '.join(public[:6])}{', ...' if len(public) > 6 else ''})" \
                if public else ""
            raise SourceError(f"{file}: has no attribute {attr!r}{hint}")
        factory = getattr(module, attr)
        if not callable(factory):
            raise SourceError(f"{file}:{attr} is a {type(factory).__name__}, not a callable factory")
        try:
            model = factory()
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            raise SourceError(f"{file}:{attr}() raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"{file}:{attr}() returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- weights
def load_weights(path: str) -> dict:
    """A state dict from ``path`` with ``torch.load(weights_only=True)`` (no code in the file is run)."""
    p = _existing_file(path, "a state dict file")
    try:
        with _quiet():
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise SourceError(f"{path}: refusing to unpickle objects other than tensors (weights_only=True){what}; "
                          "save model.state_dict() instead") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise SourceError(f"{path}: cannot read weights: {_one_line(exc)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise SourceError(f"{path}: not a state dict (got {type(obj).__name__}); "
                          "save model.state_dict() or {'state_dict': ...}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SourceError(f"{path}: state dict entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    return obj


def _few(keys: Sequence[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _apply_weights(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise SourceError(f"{path}: weights do not fit the model: {'; '.join(parts)}")
    shape = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if shape:
        k = shape[0]
        raise SourceError(f"{path}: weights do not fit the model: {k} has shape {tuple(state[k].shape)}, "
                          f"the model expects {tuple(own[k].shape)}"
                          + (f" ({len(shape)} mismatched tensors)" if len(shape) > 1 else ""))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}: weights do not fit the model: {_one_line(exc)}") from None


# --------------------------------------------------------------------------- archives
def _zip_names(p: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(p) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _load_torchscript(path: str):
    p = _existing_file(path, "a TorchScript file")
    names = _zip_names(p)
    if names is not None and any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return _load_program(path)
    if names is None or not any(n.endswith("constants.pkl") for n in names):
        if names is not None and any(n.endswith("data.pkl") for n in names):
            raise SourceError(f"{path}: is a torch.save checkpoint (e.g. a state dict), not a TorchScript archive; "
                              "convert file.py:factory --weights " + path + " instead")
        raise SourceError(f"{path}: not a TorchScript archive; for a state dict use file.py:factory --weights {path}")
    try:
        with _quiet():
            return torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}: cannot load TorchScript archive: {_one_line(exc)}") from None


def _load_program(path: str):
    p = _existing_file(path, "a .pt2 file")
    names = _zip_names(p)
    if names is None or not any(n.endswith("archive_format") for n in names):
        hint = ""
        if names is not None and any(n.endswith("constants.pkl") for n in names):
            hint = " (it is a TorchScript archive: rename it to .pt)"
        raise SourceError(f"{path}: not a torch.export program saved with torch.export.save{hint}")
    try:
        with _quiet():
            return torch.export.load(str(p))
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}: cannot load the ExportedProgram: {_one_line(exc)}") from None


# --------------------------------------------------------------------------- public API
def load_source(spec: str, weights: str | None = None) -> tuple[object, str]:
    """Load what ``spec`` names; returns ``(model, kind)`` with kind ``factory|torchscript|program``.

    ``model`` is an ``nn.Module`` (factory), a ``torch.jit.ScriptModule`` (torchscript) or a
    ``torch.export.ExportedProgram`` (program). ``weights`` is only valid with a factory."""
    kind = source_kind(spec)
    if weights is not None and kind != "factory":
        raise SourceError(f"--weights only applies to a file.py:factory source, not to {spec}")
    if kind == "factory":
        file, attr = _split_spec(spec)
        state = load_weights(weights) if weights is not None else None
        model = _load_factory(file, attr)
        if state is not None:
            _apply_weights(model, state, weights)
        return model.eval(), kind
    if kind == "torchscript":
        model = _load_torchscript(spec)
        if isinstance(model, torch.export.ExportedProgram):
            return model, "program"
        return model.eval(), kind
    return _load_program(spec), kind


def summarize(path: str | os.PathLike, exporter: str) -> dict:
    """Nodes, opset, float parameter count and input signature of a written ONNX model."""
    import onnx

    model = onnx.load(os.fspath(path))
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    params = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        params += n
    inits = {t.name for t in model.graph.initializer}
    inputs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
        inputs.append(f"{v.name}[{','.join(dims)}]")
    return {"path": os.fspath(path), "nodes": len(model.graph.node), "opset": opset, "params": params,
            "exporter": exporter, "inputs": inputs}


def _check_output_path(source: str, out: str, force: bool) -> None:
    src = source_path(source)
    if _same_file(src, out):
        raise SourceError(f"{out}: refusing to overwrite the input")
    p = Path(out)
    if p.is_dir():
        raise SourceError(f"{out}: is a directory")
    if p.exists() and not force:
        raise SourceError(f"{out}: exists (use --force to overwrite)")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise SourceError(f"{folder}: output folder does not exist")


def _program_inputs(program, input_shapes) -> tuple:
    example = program_example_inputs(program)
    shapes = program_input_shapes(program)
    if input_shapes:
        if len(input_shapes) != len(shapes):
            raise SourceError(f"the ExportedProgram has {len(shapes)} input(s), got {len(input_shapes)} --input-shape")
        for i, (want, have) in enumerate(zip(input_shapes, shapes)):
            if len(want) != len(have) or any(isinstance(h, int) and h != w for w, h in zip(want, have)):
                shown = ",".join(str(d) for d in have)
                raise SourceError(f"--input-shape {','.join(map(str, want))} does not fit input {i} of the "
                                  f"ExportedProgram (exported as {shown}; a .pt2 cannot be re-shaped)")
        if not example:
            example = tuple(torch.zeros(s) for s in input_shapes)
    if not example:
        raise SourceError("the ExportedProgram holds no example inputs; give --input-shape for each input")
    return example


def convert(source: str, out: str | os.PathLike, *, input_shapes: Sequence[Sequence[int]] | None = None,
            input_names: Sequence[str] | None = None, weights: str | None = None, exporter: str | None = None,
            opset: int | None = None, dynamic_batch: bool = True, force: bool = False) -> str:
    """Convert ``source`` (see :func:`load_source`) to the ONNX file ``out``; returns ``out``.

    ``input_shapes``: one shape per model input (float32 example inputs of that shape); required
    unless ``source`` is a ``.pt2`` (its stored example inputs are used). ``exporter``:
    ``"torchscript"`` / ``"dynamo"``; ``None`` picks torchscript, or dynamo for a ``.pt2``.
    With ``dynamic_batch`` dim 0 of every input and output is symbolic (for a ``.pt2`` the dims
    are those the program was exported with). ``out`` is written atomically after the full
    ONNX checker passed; it must not be the source, and an existing ``out`` needs ``force``.
    Raises :class:`ConversionError` (one-line message) on any failure; ``out`` is then untouched.
    """
    out = os.fspath(out)
    kind = source_kind(source)
    if exporter is None:
        exporter = "dynamo" if kind == "program" else "torchscript"
    if exporter not in EXPORTERS:
        raise SourceError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if kind == "program" and exporter != "dynamo":
        raise SourceError(f"{source}: a torch.export program (.pt2) can only be converted with --exporter dynamo")
    if opset is not None and not 7 <= int(opset) <= 30:
        raise SourceError(f"--opset {opset}: out of range")
    _check_output_path(source, out, force)
    if weights is not None and _same_file(weights, out):
        raise SourceError(f"{out}: refusing to overwrite the weights file")
    shapes = [tuple(int(d) for d in s) for s in (input_shapes or [])]
    for s in shapes:
        if not s or any(d <= 0 for d in s):
            raise SourceError(f"bad input shape {s}: every dim must be a positive integer")
    if kind != "program" and not shapes:
        raise SourceError("--input-shape is required (one per model input, e.g. --input-shape 1,3,224,224)")
    model, kind = load_source(source, weights)
    if kind == "program":
        example = _program_inputs(model, shapes)
    else:
        gen = torch.Generator().manual_seed(0)
        example = tuple(torch.randn(s, generator=gen) for s in shapes)
    if isinstance(model, torch.jit.ScriptModule) and exporter == "dynamo":
        raise SourceError(f"{source}: the dynamo exporter cannot convert a TorchScript module (it traces Python "
                          "code, which a TorchScript archive no longer has); use --exporter torchscript")
    return export_module(model, example, out, exporter=exporter, opset=opset, input_names=input_names,
                         dynamic_batch=dynamic_batch)
