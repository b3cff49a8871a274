"""Small transformer digits classifiers (ViT and BERT-style encoder) trained like ``samples/digits.py``.

Usage: ``python samples/digits_transformers.py [--out-dir samples/] [--models vit encoder]`` writes
``digits_vit.onnx`` / ``digits_encoder.onnx`` (+ ``.pt`` state dicts) and prints accuracies.
Same data split (``digits.load_data``: stratified 80/20, seed 0), same recipe (``digits.train``:
Adam + OneCycle, batch 64, seed 0, deterministic algorithms; 60 epochs here). Each 8x8 digit is a 2x2
grid of 4x4 patches:

* ``digits_vit``: input ``input`` (N, 1, 8, 8) (the ``digits_test.npz`` images as they are); Conv 4x4
  stride 4 patch embed -> 4 tokens + class token, learned pos embed, dim 32, 4 heads, 2 pre-LN timm-style
  blocks (packed qkv), MLP ratio 2, LN, head on the class token (``samples.transformers.ViT``).
* ``digits_encoder``: input ``input`` (N, 4, 16), the 4 patches flattened row-major as tokens
  (:func:`to_patches`); Linear 16 -> 48 + pos embed + LN, 2 post-LN ``nn.TransformerEncoderLayer``
  (4 heads, FFN 96, GELU), mean pool, Linear 10 (``samples.transformers.Encoder``).

Both are exported with the TorchScript exporter (opset 17), dynamic batch. The encoder's sequence
length stays static (4): the TorchScript exporter bakes ``nn.MultiheadAttention``'s sequence length
into a Reshape (see ``samples/transformers.py``), so ``samples.transformers.export`` falls back to static.
``digits_vit`` and ``digits_encoder`` (untrained architectures) are importable factories.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
# the repo root, not samples/ (its transformers.py would shadow Hugging Face's), on sys.path
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from samples.digits import SEED, accuracy, load_data, train  # noqa: E402
from samples.transformers import Encoder, ViT, export  # noqa: E402

EPOCHS = 60
DYNAMIC_AXES = {
    "vit": {"input": {0: "batch"}, "output": {0: "batch"}},
    "encoder": {"input": {0: "batch", 1: "seq"}, "output": {0: "batch"}},  # seq: static under TorchScript
}


def digits_vit() -> nn.Module:
    """Untrained digits ViT (input N x 1 x 8 x 8; 2x2 patches of 4x4 + class token)."""
    return ViT(img=8, patch=4, in_ch=1, dim=32, depth=2, heads=4, mlp_ratio=2.0)


def digits_encoder() -> nn.Module:
    """Untrained digits encoder (input N x 4 x 16: the 4 flattened 4x4 patches, see :func:`to_patches`)."""
    return Encoder(in_features=16, dim=48, heads=4, depth=2, ffn=96, max_len=4)


def to_patches(x: np.ndarray) -> np.ndarray:
    """(N, 1, 8, 8) images -> (N, 4, 16) tokens: 4x4 patches in row-major order, each flattened row-major."""
    n = x.shape[0]
    return np.ascontiguousarray(x.reshape(n, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(n, 4, 16))


MODELS = {"vit": (digits_vit, lambda x: x), "encoder": (digits_encoder, to_patches)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=_HERE)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these tiny models train fastest single-threaded; 0: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort

    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.models:
        factory, prep = MODELS[name]
        xtr, xte = prep(x_tr), prep(x_te)
        torch.manual_seed(args.seed)  # init weights from the same seed whatever the model order
        model = factory()
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.time()
        model = train(model, xtr, y_tr, epochs=args.epochs, seed=args.seed)
        elapsed = time.time() - t0
        with torch.no_grad():
            torch_acc = accuracy(model(torch.from_numpy(xte)).numpy(), y_te)
        onnx_path = os.path.join(args.out_dir, f"digits_{name}.onnx")
        export(model, onnx_path, "torchscript", example=torch.from_numpy(xte[:2]), dynamic_axes=DYNAMIC_AXES[name])
        torch.save(model.state_dict(), os.path.join(args.out_dir, f"digits_{name}.pt"))
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        onnx_acc = accuracy(sess.run(None, {"input": xte})[0], y_te)
        dims = sess.get_inputs()[0].shape
        print(f"digits_{name}: {n_params} params, input {dims}, trained {args.epochs} epochs in {elapsed:.1f}s "
              f"({torch.get_num_threads()} threads); test accuracy torch {torch_acc:.4f}, "
              f"onnx {onnx_acc:.4f} ({len(xte)} images) -> {onnx_path} ({os.path.getsize(onnx_path) / 1024:.0f} KiB)")
        if onnx_acc != torch_acc:
            print(f"digits_{name}: onnxruntime and torch accuracies differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
