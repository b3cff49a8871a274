"""Export PyTorch modules to ONNX with either the TorchScript or the dynamo exporter."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Sequence

import onnx
import torch
from torch import nn

__all__ = ["ConversionError", "export_module", "EXPORTERS", "program_example_inputs", "program_input_shapes"]

EXPORTERS = ("torchscript", "dynamo")
_DEFAULT_TORCHSCRIPT_OPSET = 17


class ConversionError(Exception):
    """Raised when a module cannot be exported to ONNX (one-line, user-facing message)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """Summarise an exception (and its root cause, if chained) as a single line."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = _first_line(exc)
    if root is not exc:
        head = text.split(". ")[0].rstrip(".")
        text = f"{head}: {_first_line(root)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_names(prefix: str, n: int) -> list[str]:
    return [prefix if i == 0 else f"{prefix}_{i}" for i in range(n)]


def _count_outputs(module: nn.Module, inputs: tuple) -> int:
    with torch.no_grad():
        out = module(*inputs)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (list, tuple)):
        return len(out)
    raise ConversionError(f"unsupported output type {type(out).__name__}; return a tensor or tuple of tensors")


@contextlib.contextmanager
def _quiet():
    """Silence warnings, logging and stdout/stderr chatter (Python and C++ level) during export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = []
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:
                    pass
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            buf = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                warnings.simplefilter("ignore")
                yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)


def _is_exported_program(obj) -> bool:
    return isinstance(obj, torch.export.ExportedProgram)


def _is_script_module(obj) -> bool:
    return isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def program_example_inputs(program) -> tuple:
    """The positional example inputs stored in an ExportedProgram (empty tuple when there are none)."""
    example = getattr(program, "example_inputs", None)
    if not example:
        return ()
    args, kwargs = example if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) \
        else (example, {})
    if kwargs:
        raise ConversionError("the ExportedProgram takes keyword inputs; only positional tensor inputs are supported")
    return tuple(args)


def program_input_shapes(program) -> list[tuple]:
    """Shapes of the user inputs of an ExportedProgram; symbolic dims are returned as strings."""
    shapes = []
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ConversionError(f"ExportedProgram input {node.name!r} is not a tensor")
            shapes.append(tuple(int(d) if isinstance(d, int) else str(d) for d in val.shape))
    return shapes


def _checked_replace(tmp: str, path: str, exporter: str, hint: str) -> None:
    """Full checker on the temporary file, plain-open() permissions, then the atomic rename."""
    try:
        model = onnx.load(tmp)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"{exporter} exporter produced an invalid model: {_one_line(exc)}{hint}") from exc
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
    except OSError:
        pass
    os.replace(tmp, path)


def export_module(
    module,
    example_inputs,
    path: str | os.PathLike,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    fold_constants: bool = True,
) -> str:
    """Export ``module`` (switched to eval mode) to an ONNX file at ``path`` and return the path.

    ``module`` is an ``nn.Module``, a TorchScript module (torchscript exporter only) or a
    ``torch.export.ExportedProgram`` (dynamo exporter only; its own input shapes and dynamic
    dims are used, ``example_inputs`` may be empty and ``dynamic_batch`` is ignored).
    ``example_inputs`` is a tensor or a tuple of tensors. ``exporter`` is ``"torchscript"``
    (legacy ``torch.onnx.export(dynamo=False)``, opset 17 by default) or ``"dynamo"``
    (``torch.onnx.export(dynamo=True)``, exporter's default opset). With ``dynamic_batch``
    dim 0 of every input and output is symbolic. ``fold_constants`` is ``do_constant_folding``
    for torchscript and ``optimize`` for dynamo; with it, eval-mode BatchNorm after Conv is
    fused into the Conv by both exporters.

    The file is written atomically: the model is exported to a temporary file in the target
    folder, checked with the full ``onnx.checker`` and only then renamed to ``path``; no
    temporary file is left behind on failure and an existing ``path`` is untouched.
    Raises :class:`ConversionError` on failure.
    """
    if exporter not in EXPORTERS:
        raise ConversionError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    is_program = _is_exported_program(module)
    if is_program:
        if exporter != "dynamo":
            raise ConversionError("a torch.export ExportedProgram (.pt2) can only be converted with the dynamo "
                                  "exporter (--exporter dynamo)")
        if example_inputs is None or (isinstance(example_inputs, (tuple, list)) and not example_inputs):
            example_inputs = program_example_inputs(module)
    elif _is_script_module(module):
        if exporter != "torchscript":
            raise ConversionError("the dynamo exporter cannot convert a TorchScript module (it traces Python "
                                  "code, which a TorchScript archive no longer has); use --exporter torchscript")
    elif not isinstance(module, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if example_inputs is None:
        example_inputs = ()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConversionError("example_inputs must be a tensor or a non-empty tuple of tensors")
    path = os.fspath(path)
    if is_program:
        n_out = len(module.graph_signature.user_outputs)
    else:
        module.eval()
        try:
            n_out = _count_outputs(module, inputs)
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"module forward failed on the example inputs: {_one_line(exc)}") from exc
    in_names = list(input_names) if input_names else _default_names("input", len(inputs))
    out_names = list(output_names) if output_names else _default_names("output", n_out)
    if len(in_names) != len(inputs):
        raise ConversionError(f"got {len(in_names)} input names for {len(inputs)} inputs")
    if len(set(in_names)) != len(in_names):
        raise ConversionError(f"input names must be distinct, got {', '.join(in_names)}")
    if len(out_names) != n_out:
        raise ConversionError(f"got {len(out_names)} output names for {n_out} outputs")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    other = "dynamo" if exporter == "torchscript" else "torchscript"
    hint = "" if is_program else f"; try the {other} exporter (--exporter {other})"

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        try:
            with _quiet(), torch.no_grad():
                if exporter == "torchscript":
                    dynamic_axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
                    torch.onnx.export(
                        module, inputs, tmp, dynamo=False, opset_version=opset or _DEFAULT_TORCHSCRIPT_OPSET,
                        input_names=in_names, output_names=out_names, dynamic_axes=dynamic_axes,
                        do_constant_folding=fold_constants,
                    )
                else:
                    kwargs = {"opset_version": opset} if opset else {}
                    if is_program:
                        args: tuple = ()
                    else:
                        args = inputs
                        if dynamic_batch:
                            batch = torch.export.Dim("batch", min=1, max=4096)
                            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
                    program = torch.onnx.export(
                        module, args, None, dynamo=True, input_names=in_names, output_names=out_names,
                        optimize=fold_constants, verbose=False, external_data=False, **kwargs,
                    )
                    program.save(tmp, external_data=False)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"{exporter} exporter failed: {_one_line(exc)}{hint}") from exc
        _checked_replace(tmp, path, exporter, hint)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
