"""Model converters that produce ONNX files graphprune can consume."""

from .torch_to_onnx import EXPORTERS, ConversionError, export_module

__all__ = ["ConversionError", "EXPORTERS", "export_module"]
