"""Calibration data and the loss whose curvature the criteria estimate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..calib import load_npz, match_inputs
from ..errors import UserError
from ..runtime import random_inputs

LOSSES = ("auto", "labels", "true-fisher", "empirical-fisher", "gauss-newton")


@dataclass
class CalibData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            feeds = {k: v[start:start + batch_size] for k, v in self.inputs.items()}
            labels = None if self.labels is None else self.labels[start:start + batch_size]
            yield feeds, labels


def load_calib(model: onnx.ModelProto, path: str | None, samples: int, seed: int = 0,
               shapes=None) -> CalibData:
    """Load `--calib FILE.npz` (first `samples` rows); without a file, Gaussian noise inputs (a
    fallback for structure-only checks: curvature from noise is not a substitute for real data)."""
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if path is None:
        feeds = random_inputs(model, batch=samples, seed=seed, shapes=shapes)
        return CalibData(feeds, None, "random (no --calib given)")
    arrays = load_npz(path)
    feeds = match_inputs(model, arrays, path)
    n = len(next(iter(feeds.values())))
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != n:
            raise UserError(f"{path}: 'labels' must be a 1-D integer array with one label per sample")
        labels = labels.astype(np.int64)[:samples]
    if n < samples:
        samples = n
    return CalibData({k: v[:samples] for k, v in feeds.items()}, labels, str(path))


def resolve_loss(kind: str, data: CalibData, output_shape) -> str:
    if kind not in LOSSES:
        raise UserError(f"unknown --loss {kind!r} (choose from {', '.join(LOSSES)})")
    classifier = output_shape is not None and len(output_shape) == 2 and (output_shape[1] or 0) != 1
    if kind == "auto":
        if data.labels is not None and classifier:
            return "labels"
        return "true-fisher" if classifier else "gauss-newton"
    if kind in ("labels", "empirical-fisher") and not classifier:
        raise UserError(f"--loss {kind} needs a classifier output (N x classes)")
    if kind == "labels" and data.labels is None:
        raise UserError("--loss labels needs a 'labels' array in the --calib file")
    return kind


def loss_value(kind: str, out: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Mean over the batch of the per-sample loss whose Fisher/Gauss-Newton we estimate."""
    if kind == "labels":
        return F.cross_entropy(out, labels)
    if kind == "true-fisher":  # y ~ p(y|x): the expected outer product of gradients is the Fisher
        y = torch.multinomial(torch.softmax(out.detach().double(), dim=1), 1, generator=gen).squeeze(1)
        return F.cross_entropy(out, y.to(out.device))
    if kind == "empirical-fisher":
        return F.cross_entropy(out, out.detach().argmax(dim=1))
    # gauss-newton: Gaussian likelihood around the model's own output, target sampled
    noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    target = out.detach() + noise
    return 0.5 * (out - target).pow(2).reshape(len(out), -1).sum(1).mean()
