"""Train a small ResNet-style CNN on scikit-learn's 8x8 digits and export it to ONNX.

Usage: ``python samples/digits.py --out-dir samples/`` writes ``digits_resnet.onnx``,
``digits_resnet.pt`` (state_dict), ``digits_test.npz`` and ``digits_calib.npz``.
``digits_resnet`` (untrained architecture) is importable as a factory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
INPUT_SHAPE = (1, 1, 8, 8)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """stem 1->32, BasicBlock 32->32 (identity), BasicBlock 32->64 (stride 2, 1x1 projection), GAP, Linear 10."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = BasicBlock(32, 32)
        self.layer2 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet() -> nn.Module:
    """Untrained digits ResNet (input N x 1 x 8 x 8)."""
    return DigitsResNet()


def load_data(seed: int = SEED):
    """Stratified 80/20 split of sklearn digits, scaled to [0, 1], shape (N, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def train(model, x_tr, y_tr, epochs=40, batch=64, lr=3e-3, seed=SEED):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import onnxruntime as ort

    from converters import export_module

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    t0 = time.time()
    model = train(digits_resnet(), x_tr, y_tr, epochs=args.epochs, seed=args.seed)
    print(f"trained {args.epochs} epochs on {len(x_tr)} images in {time.time() - t0:.1f}s")
    with torch.no_grad():
        torch_acc = accuracy(model(torch.from_numpy(x_te)).numpy(), y_te)
    print(f"torch test accuracy: {torch_acc:.4f} ({len(x_te)} images)")

    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "digits_resnet.onnx")
    export_module(model, (torch.from_numpy(x_te[:1]),), onnx_path, exporter="torchscript", dynamic_batch=True)
    torch.save(model.state_dict(), os.path.join(args.out_dir, "digits_resnet.pt"))
    np.savez(os.path.join(args.out_dir, "digits_test.npz"), input=x_te, labels=y_te)
    calib = np.random.default_rng(args.seed).permutation(len(x_tr))[:256]
    np.savez(os.path.join(args.out_dir, "digits_calib.npz"), input=x_tr[calib], labels=y_tr[calib])

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_acc = accuracy(sess.run(None, {"input": x_te})[0], y_te)
    print(f"onnx test accuracy:  {onnx_acc:.4f} (onnxruntime, {onnx_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
