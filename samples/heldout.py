"""Held-out digits classifiers (MobileNetV2, DenseNet-BC, RegNetY+SE) graphprune was not tuned on.

Usage: ``python samples/heldout.py --out-dir samples/`` writes ``heldout_<name>.onnx`` and
``heldout_<name>.pt`` (state dict) for the three models below, ``heldout_calib.npz`` and
``heldout_test.npz``, and prints each model's accuracy, parameter count and training time.
``--models`` trains a subset; ``--threads`` (default 1) fixes torch's intra-op threads, since the
figures below were produced with one thread and other thread counts may change the last bits.

The networks are written after the common public definitions (not after graphprune's sample
zoo), at the sizes an outside user would pick for 32x32 inputs:

* ``heldout_mobilenet_v2``: MobileNetV2 (Sandler et al. 2018) at width multiplier 0.5: stem
  3x3 conv (stride 1) -> inverted residuals (1x1 expand with t=6 except the first stage, depthwise
  3x3, linear 1x1 project, ReLU6, residual add when shape is kept) with the standard (t, c, n, s)
  table (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), widths
  ``make_divisible(c * 0.5, 8)``; as in the CIFAR variants the first two stride-2 stages run at
  stride 1 (so 32x32 -> 32 -> 16 -> 8); last 1x1 conv 640 (= 1280 * 0.5), GAP, dropout 0.2,
  Linear 10.
* ``heldout_densenet``: DenseNet-BC (Huang et al. 2017), growth rate 12, 3x3 stem conv to 24
  features, three dense blocks of (4, 4, 4) bottleneck layers BN -> ReLU -> Conv1x1 (48) -> BN ->
  ReLU -> Conv3x3 (12), concatenated; transitions BN -> ReLU -> Conv1x1 (compression 0.5) ->
  AvgPool 2; final BN -> ReLU -> GAP -> Linear 10. Exported so that the pre-activation
  BatchNormalization nodes stay in the graph (they cannot be folded into a preceding conv).
* ``heldout_regnet_se``: RegNetY-style (Radosavovic et al. 2020): stem 3x3 conv 24, three stages
  of X-blocks with widths (24, 56, 152), depths (1, 2, 2), strides (1, 2, 2); each block 1x1 conv
  -> 3x3 group conv (group width 8) -> squeeze-excite (GAP, 1x1 conv to a quarter of the block's
  input width, ReLU, 1x1 conv, Sigmoid gate) -> 1x1 conv, BN after every conv, residual add with a
  1x1 conv + BN projection shortcut on a stride or width change, ReLU; GAP, Linear 10.

Data (the format an outside user would feed): scikit-learn's 8x8 digits scaled to [0, 1],
upsampled to 32x32 (``F.interpolate``, bilinear, ``align_corners=False``), replicated to 3
channels and normalised with the training split's mean and std; stratified split of 1300
training / 497 test images (``random_state=0``). Input ``input`` (N, 3, 32, 32) float32, output
``output`` (N, 10) logits, dynamic batch. ``heldout_test.npz`` holds the 497 test images and
labels; ``heldout_calib.npz`` 256 images (and labels) drawn from the training split.

Training: ``samples/digits.py``'s ``train`` (Adam, weight decay 1e-4, OneCycle, batch 64, seed 0,
deterministic algorithms), max lr 3e-3; 15 epochs for MobileNetV2 (its 32x32 stages are slow on a
CPU), 30 for the other two (``RECIPES``). Export: TorchScript exporter
(``dynamo=False``), opset 17, ``training=EVAL``, constant folding (BatchNorm right after a Conv is
folded into it).

Measured (one thread; test accuracy with onnxruntime on the 497 test images):

    model                  test acc.          params   MACs (batch 1)  ONNX      training
    heldout_mobilenet_v2   99.40%  (494/497)  590,410  81.4M           2.3 MB    15 epochs, 1467 s
    heldout_densenet       99.80%  (496/497)  102,730  43.7M           0.4 MB    30 epochs, 972 s
    heldout_regnet_se      99.60%  (495/497)  155,400  18.4M           0.6 MB    30 epochs, 578 s

(params: torch parameters, BatchNorm included; torch and onnxruntime accuracies agree; MACs as
``graphprune inspect`` counts them at 1x3x32x32; training times were measured with other jobs on the
machine and are only indicative.)
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samples.digits import SEED, accuracy, train  # noqa: E402
from samples.digits_models import DenseLayer, Transition, _conv_bn  # noqa: E402

N_TEST = 497
N_CALIB = 256
SIZE = 32
OPSET = 17


def load_data(seed: int = SEED):
    """Stratified 1300/497 split of sklearn digits as (N, 3, 32, 32) float32 images, normalised with
    the training split's mean/std. Returns x_tr, x_te, y_tr, y_te."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1).numpy()
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=N_TEST, stratify=y, random_state=seed)
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True)
    x_tr, x_te = ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)
    return x_tr, x_te, y_tr, y_te


# ---------------------------------------------------------------------------------------------
# MobileNetV2, width 0.5


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never going below 90% of ``v`` (MobileNet reference)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """[1x1 expand (ReLU6) if t != 1] -> depthwise 3x3 (ReLU6) -> 1x1 linear project; residual add
    when stride 1 and cin == cout."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = int(round(cin * expand))
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class HeldoutMobileNetV2(nn.Module):
    # (t, c, n, s) of the paper; the first two stride-2 stages (c=24, c=32) run at stride 1 for 32x32
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 1), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10, width=0.5, last_channel=640, dropout=0.2):
        super().__init__()
        cin = make_divisible(32 * width)
        layers = [_conv_bn(3, cin, 3, 1)]
        for t, c, n, s in self.cfg:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn(cin, last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def heldout_mobilenet_v2() -> nn.Module:
    """Untrained MobileNetV2 x0.5 for (N, 3, 32, 32) inputs."""
    return HeldoutMobileNetV2()


# ---------------------------------------------------------------------------------------------
# DenseNet-BC (k=12, blocks 4-4-4); DenseLayer / Transition are digits_models.py's (same BC layers)


class HeldoutDenseNet(nn.Module):
    def __init__(self, num_classes=10, growth=12, blocks=(4, 4, 4), init_features=24, compression=0.5):
        super().__init__()
        self.stem = nn.Conv2d(3, init_features, 3, 1, 1, bias=False)
        layers, c = [], init_features
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth, bottleneck=4))
                c += growth
            if i != len(blocks) - 1:
                cout = int(c * compression)
                layers.append(Transition(c, cout))
                c = cout
        self.features = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def heldout_densenet() -> nn.Module:
    """Untrained DenseNet-BC (k=12, 4-4-4) for (N, 3, 32, 32) inputs."""
    return HeldoutDenseNet()


# ---------------------------------------------------------------------------------------------
# RegNetY-style (X-block + squeeze-excite)


class SqueezeExcite(nn.Module):
    def __init__(self, width, se_channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(width, se_channels, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(se_channels, width, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class YBlock(nn.Module):
    """1x1 conv-BN-ReLU -> 3x3 group conv-BN-ReLU (group width 8) -> SE -> 1x1 conv-BN, + shortcut, ReLU."""

    def __init__(self, cin, cout, stride, group_width=8, se_ratio=0.25):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, stride, 1, groups=cout // group_width, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU())
        self.se = SqueezeExcite(cout, max(1, int(round(cin * se_ratio))))
        self.c = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(self.c(self.se(self.b(self.a(x)))) + shortcut)


class HeldoutRegNetSE(nn.Module):
    def __init__(self, num_classes=10, stem=24, widths=(24, 56, 152), depths=(1, 2, 2), strides=(1, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        layers, cin = [], stem
        for w, d, s in zip(widths, depths, strides):
            for i in range(d):
                layers.append(YBlock(cin, w, s if i == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def heldout_regnet_se() -> nn.Module:
    """Untrained RegNetY-style net with SE for (N, 3, 32, 32) inputs."""
    return HeldoutRegNetSE()


MODELS = {"mobilenet_v2": heldout_mobilenet_v2, "densenet": heldout_densenet, "regnet_se": heldout_regnet_se}
# training settings per model (epochs, max lr) for samples/digits.py's train
RECIPES = {"mobilenet_v2": (15, 3e-3), "densenet": (30, 3e-3), "regnet_se": (30, 3e-3)}


def export(model: nn.Module, example: torch.Tensor, path: str) -> str:
    """TorchScript ONNX export (opset 17, eval mode, constant folding, dynamic batch), checked."""
    import onnx

    model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=OPSET, training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    p.add_argument("--lr", type=float, default=None, help="override every model's max learning rate")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import warnings

    import onnx
    import onnxruntime as ort

    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(args.out_dir, "heldout_test.npz"), input=x_te, labels=y_te)
    calib = np.random.default_rng(args.seed).permutation(len(x_tr))[:N_CALIB]
    np.savez_compressed(os.path.join(args.out_dir, "heldout_calib.npz"), input=x_tr[calib], labels=y_tr[calib])
    print(f"data: {len(x_tr)} training / {len(x_te)} test images {tuple(x_te.shape[1:])}; "
          f"{N_CALIB} calibration images from the training split")

    for name in args.models:
        epochs, lr = RECIPES[name]
        epochs, lr = args.epochs or epochs, args.lr or lr
        torch.manual_seed(args.seed)  # init weights from the same seed whatever the model order
        model = MODELS[name]()
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.time()
        model = train(model, x_tr, y_tr, epochs=epochs, lr=lr, seed=args.seed)
        elapsed = time.time() - t0
        with torch.no_grad():
            torch_acc = accuracy(model(torch.from_numpy(x_te)).numpy(), y_te)
        onnx_path = export(model, torch.from_numpy(x_te[:1]), os.path.join(args.out_dir, f"heldout_{name}.onnx"))
        torch.save(model.state_dict(), os.path.join(args.out_dir, f"heldout_{name}.pt"))
        ops = {n.op_type for n in onnx.load(onnx_path).graph.node}
        if name == "densenet" and "BatchNormalization" not in ops:
            raise SystemExit(f"{onnx_path}: no BatchNormalization node left in the export")
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        onnx_acc = accuracy(sess.run(None, {"input": x_te})[0], y_te)
        print(f"heldout_{name}: {n_params} params, {epochs} epochs at max lr {lr:g} in {elapsed:.1f}s "
              f"({torch.get_num_threads()} threads); test accuracy torch {torch_acc:.4f}, onnx {onnx_acc:.4f} "
              f"({int(round(onnx_acc * len(y_te)))}/{len(y_te)}) -> {onnx_path} "
              f"({os.path.getsize(onnx_path) / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
