"""`graphprune convert SOURCE -o MODEL.onnx`: PyTorch (factory, TorchScript, .pt2) -> ONNX."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from ..errors import UserError

HELP = "convert a PyTorch model (file.py:factory, TorchScript, .pt2) to ONNX"


def _shape(text: str) -> tuple[int, ...]:
    from converters.load_torch import SourceError, parse_input_shape

    try:
        return parse_input_shape(text)
    except SourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _opset(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 7 <= v <= 30:
        raise argparse.ArgumentTypeError(f"must be between 7 and 30, got {v}")
    return v


def register(sub, common) -> None:
    p = sub.add_parser("convert", help=HELP, description=HELP + ". Only the file named on the command line is "
                       "imported; weights are read with torch.load(weights_only=True); nothing is downloaded.")
    p.add_argument("source", metavar="SOURCE",
                   help="path/to/file.py:factory (a function returning an nn.Module), a TorchScript file "
                        "(.pt/.pth/.ts/.torchscript) or a torch.export program (.pt2)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write")
    p.add_argument("--input-shape", dest="input_shapes", action="append", type=_shape, metavar="1,3,224,224",
                   help="shape of one model input (repeat for several inputs); optional for .pt2")
    p.add_argument("--input-name", dest="input_names", action="append", metavar="NAME",
                   help="name of one model input (repeat, in order; default input, input_1, ...)")
    p.add_argument("--weights", metavar="STATE_DICT.pt",
                   help="state dict for a factory source (torch.load with weights_only=True)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default=None,
                   help="ONNX exporter (default: torchscript; dynamo for .pt2)")
    p.add_argument("--opset", type=_opset, default=None, help="ONNX opset (default: 17 for torchscript, "
                   "the exporter's default for dynamo)")
    p.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a symbolic one")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(run=_run, _human=common.get("human"))


def convert(source: str, out: str | os.PathLike, *, input_shapes: Sequence[Sequence[int]] | None = None,
            input_names: Sequence[str] | None = None, weights: str | None = None, exporter: str | None = None,
            opset: int | None = None, dynamic_batch: bool = True, force: bool = False) -> str:
    """:func:`converters.load_torch.convert` with failures raised as :class:`UserError` (exit 2)."""
    from converters.load_torch import convert as _convert
    from converters.torch_to_onnx import ConversionError

    try:
        return _convert(source, out, input_shapes=input_shapes, input_names=input_names, weights=weights,
                        exporter=exporter, opset=opset, dynamic_batch=dynamic_batch, force=force)
    except ConversionError as exc:
        raise UserError(str(exc)) from None


def _run(args) -> int:
    from converters.load_torch import source_kind, summarize

    # the exporter that will run (for the summary)
    try:
        kind = source_kind(args.source)
    except Exception:  # noqa: BLE001 - convert() reports it
        kind = None
    exporter = args.exporter or ("dynamo" if kind == "program" else "torchscript")
    out = convert(args.source, args.output, input_shapes=args.input_shapes, input_names=args.input_names,
                  weights=args.weights, exporter=args.exporter, opset=args.opset,
                  dynamic_batch=not args.static_batch, force=args.force)
    s = summarize(out, exporter)
    human = args._human or (lambda n: str(n))
    print(f"wrote {out}: {s['nodes']} nodes, opset {s['opset']}, {human(s['params'])} params, "
          f"exporter {s['exporter']}, inputs {' '.join(s['inputs'])}")
    return 0
