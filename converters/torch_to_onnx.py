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

__all__ = ["ConversionError", "export_module", "EXPORTERS"]

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


def export_module(
    module: nn.Module,
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

    ``example_inputs`` is a tensor or a tuple of tensors. ``exporter`` is ``"torchscript"``
    (legacy ``torch.onnx.export(dynamo=False)``, opset 17 by default) or ``"dynamo"``
    (``torch.onnx.export(dynamo=True)``, exporter's default opset). With ``dynamic_batch``
    dim 0 of every input and output is symbolic. ``fold_constants`` is ``do_constant_folding``
    for torchscript and ``optimize`` for dynamo; with it, eval-mode BatchNorm after Conv is
    fused into the Conv by both exporters. Raises :class:`ConversionError` on failure.
    """
    if exporter not in EXPORTERS:
        raise ConversionError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not isinstance(module, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(module).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConversionError("example_inputs must be a tensor or a non-empty tuple of tensors")
    path = os.fspath(path)
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
    if len(out_names) != n_out:
        raise ConversionError(f"got {len(out_names)} output names for {n_out} outputs")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    other = "dynamo" if exporter == "torchscript" else "torchscript"

    try:
        with _quiet(), torch.no_grad():
            if exporter == "torchscript":
                dynamic_axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
                torch.onnx.export(
                    module, inputs, path, dynamo=False, opset_version=opset or _DEFAULT_TORCHSCRIPT_OPSET,
                    input_names=in_names, output_names=out_names, dynamic_axes=dynamic_axes,
                    do_constant_folding=fold_constants,
                )
            else:
                dynamic_shapes = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    dynamic_shapes = tuple({0: batch} for _ in inputs)
                kwargs = {"opset_version": opset} if opset else {}
                program = torch.onnx.export(
                    module, inputs, None, dynamo=True, input_names=in_names, output_names=out_names,
                    dynamic_shapes=dynamic_shapes, optimize=fold_constants, verbose=False,
                    external_data=False, **kwargs,
                )
                program.save(path, external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(
            f"{exporter} exporter failed: {_one_line(exc)} (try exporter={other!r})"
        ) from exc

    try:
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(
            f"{exporter} exporter produced an invalid model: {_one_line(exc)} (try exporter={other!r})"
        ) from exc
    return path
