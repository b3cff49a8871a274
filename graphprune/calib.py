"""Calibration / evaluation data: .npz files with one array per graph input (plus optional labels)."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import onnx

from .errors import UserError
from .runtime import _NP
from .shapes import declared_inputs


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    if not zipfile.is_zipfile(path):  # also catches .npy files, which np.load returns as a bare array
        raise UserError(f"{path}: not an .npz file (expected np.savez output: one array per input + 'labels')")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def match_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    """Map arrays to graph inputs by name (or the single array for a single-input model) and check them."""
    specs = []
    for name, dims, elem in declared_inputs(model):
        if elem not in _NP:
            raise UserError(f"input {name!r} has an unsupported element type")
        specs.append((name, dims, _NP[elem]))
    data = {k: v for k, v in arrays.items() if k != "labels"}
    if len(specs) == 1 and specs[0][0] not in data and len(data) == 1:
        data = {specs[0][0]: next(iter(data.values()))}
    feeds = {}
    n = None
    for name, shape, dtype in specs:
        if name not in data:
            raise UserError(f"{path}: no array for model input {name!r} (arrays: {', '.join(sorted(arrays)) or 'none'})")
        arr = data[name]
        if shape is not None and (arr.ndim != len(shape) or any(isinstance(s, int) and s != d
                                                                for s, d in zip(shape[1:], arr.shape[1:]))):
            want = ", ".join(str(s) if isinstance(s, int) else (s or "?") for s in shape[1:])
            raise UserError(f"{path}: array {name!r} has shape {tuple(arr.shape)}, model expects (N, {want})")
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise UserError(f"{path}: array {name!r} holds no samples")
        if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise UserError(f"{path}: array {name!r} has dtype {arr.dtype}, model expects {np.dtype(dtype)}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise UserError(f"{path}: array {name!r} contains NaN or Inf")
        if n is not None and len(arr) != n:
            raise UserError(f"{path}: arrays have different sample counts")
        n = len(arr)
        feeds[name] = arr.astype(dtype, copy=False)
    unused = set(data) - set(feeds)
    if unused:
        raise UserError(f"{path}: arrays {sorted(unused)} match no model input")
    return feeds


def load_labelled(model: onnx.ModelProto, path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    arrays = load_npz(path)
    if "labels" not in arrays:
        raise UserError(f"{path}: no 'labels' array (needed for accuracy)")
    labels = arrays["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: 'labels' must be a 1-D integer array")
    feeds = match_inputs(model, arrays, path)
    if len(labels) == 0:
        raise UserError(f"{path}: no samples")
    if len(labels) != len(next(iter(feeds.values()))):
        raise UserError(f"{path}: {len(labels)} labels for {len(next(iter(feeds.values())))} samples")
    return feeds, labels.astype(np.int64)
