"""More digits classifiers (MobileNetV2- and DenseNet-style) trained like ``samples/digits.py``.

Usage: ``python samples/digits_models.py [--out-dir samples/] [--models mobilenet_v2 densenet]`` writes
``digits_mobilenet_v2.onnx`` / ``digits_densenet.onnx`` (+ ``.pt`` state dicts) and prints accuracies.
Same data split (``digits.load_data``), same training recipe (``digits.train``: Adam + OneCycle,
40 epochs, batch 64, seed 0, deterministic algorithms), exported with the TorchScript exporter
(dynamic batch, input ``input``, BatchNorm after Conv folded). The calibration/test ``.npz`` files
are the ones written by ``samples/digits.py``.

``digits_mobilenet_v2`` and ``digits_densenet`` (untrained architectures) are importable factories.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samples.digits import SEED, accuracy, load_data, train  # noqa: E402


# ---------------------------------------------------------------------------------------------
# MobileNetV2-style


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> depthwise 3x3 (ReLU6) -> 1x1 project (linear); residual add when shapes match."""

    def __init__(self, cin, cout, stride=1, expand=4):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        )
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class DigitsMobileNetV2(nn.Module):
    """stem 3x3 1->32, IR 32->32 x2 (residual), IR 32->48 (stride 2), IR 48->48 x2 (residual),
    all expansion 4; 1x1 conv 48->128 (ReLU6), GAP, Linear 10."""

    cfg = [(32, 1), (32, 1), (48, 2), (48, 1), (48, 1)]  # (cout, stride)

    def __init__(self, num_classes=10, expand=4):
        super().__init__()
        layers, cin = [_conv_bn(1, 32, 3)], 32
        for cout, stride in self.cfg:
            layers.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
        layers.append(_conv_bn(cin, 128, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def digits_mobilenet_v2() -> nn.Module:
    """Untrained digits MobileNetV2 (input N x 1 x 8 x 8)."""
    return DigitsMobileNetV2()


# ---------------------------------------------------------------------------------------------
# DenseNet-style


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (-> bottleneck x growth) - BN-ReLU-Conv3x3 (-> growth), concatenated to the input."""

    def __init__(self, cin, growth, bottleneck=4):
        super().__init__()
        mid = bottleneck * growth
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compression) - AvgPool 2x2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.bn(x))))


class DigitsDenseNet(nn.Module):
    """stem 3x3 1->32, dense block (4 layers, growth 16) -> 96, transition 1x1 96->48 + avgpool 2,
    dense block (4 layers, growth 16) -> 112, BN-ReLU, GAP, Linear 10."""

    def __init__(self, num_classes=10, stem=32, growth=16, layers=(4, 4), compression=0.5):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, 1, 1, bias=False)
        blocks, c = [], stem
        for i, n in enumerate(layers):
            for _ in range(n):
                blocks.append(DenseLayer(c, growth))
                c += growth
            if i != len(layers) - 1:
                cout = int(c * compression)
                blocks.append(Transition(c, cout))
                c = cout
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_densenet() -> nn.Module:
    """Untrained digits DenseNet (input N x 1 x 8 x 8)."""
    return DigitsDenseNet()


MODELS = {"mobilenet_v2": digits_mobilenet_v2, "densenet": digits_densenet}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort

    from converters import export_module

    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.models:
        torch.manual_seed(args.seed)  # init weights from the same seed whatever the model order
        model = MODELS[name]()
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.time()
        model = train(model, x_tr, y_tr, epochs=args.epochs, seed=args.seed)
        elapsed = time.time() - t0
        with torch.no_grad():
            torch_acc = accuracy(model(torch.from_numpy(x_te)).numpy(), y_te)
        onnx_path = os.path.join(args.out_dir, f"digits_{name}.onnx")
        export_module(model, (torch.from_numpy(x_te[:1]),), onnx_path, exporter="torchscript", dynamic_batch=True)
        torch.save(model.state_dict(), os.path.join(args.out_dir, f"digits_{name}.pt"))
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        onnx_acc = accuracy(sess.run(None, {"input": x_te})[0], y_te)
        print(f"digits_{name}: {n_params} params, trained {args.epochs} epochs in {elapsed:.1f}s "
              f"({torch.get_num_threads()} threads); test accuracy torch {torch_acc:.4f}, "
              f"onnx {onnx_acc:.4f} ({len(x_te)} images) -> {onnx_path} ({os.path.getsize(onnx_path) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
