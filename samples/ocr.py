"""An OCR-style text-line recogniser with a wide per-position softmax (benchmarks/scoring_cost.py).

Shaped after the common mobile recognisers (CRNN / PP-OCR-style: a convolutional backbone that
reduces the height of a 48 x 320 line image to 1 while keeping W / 8 = 40 horizontal positions, then
a small attention neck over the 40 positions and a per-position classifier over a 6,625-symbol
dictionary, softmax at the end):

    input (N, 3, 48, 320)
    -> Conv3x3 s2 (32) -> BN -> ReLU                                  24 x 160
    -> depthwise-separable blocks (64 s1, 128 s2, 128, 256 s2, 256, 384 s(2,1), 384)  ->  3 x 40
    -> MaxPool (3, 1) over the height                                  1 x 40
    -> (N, 40, 384) -> Linear 384 -> 256
    -> one pre-LN attention block (4 heads, explicit q/k/v Linear, softmax(q kᵀ / √d) v, MLP 256->512->256)
    -> LayerNorm -> Linear 256 -> 6625 -> Softmax over the classes
    output (N, 40, 6625)

About 2.7M parameters (1.7M of them the classifier), 0.19 GMACs per line. Random weights: it is for measuring cost and
checking the per-position loss, not for reading text. :func:`export` writes it with the TorchScript
exporter (``dynamo=False``), opset 17, dynamic batch; BatchNorm is folded into the convs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

H, W, T, CLASSES = 48, 320, 40, 6625
INPUT_SHAPE = (1, 3, H, W)


def _conv_bn(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, tuple(x // 2 for x in ((k, k) if isinstance(k, int) else k)),
                                   groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DWBlock(nn.Module):
    """Depthwise 3x3 (stride s) -> pointwise 1x1, each with BN + ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dw = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = _conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape

        def split(y):
            return y.reshape(b, t, self.heads, self.d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.d)), dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, c))


class Neck(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class OCRRecognizer(nn.Module):
    def __init__(self, in_ch=3, classes=CLASSES, dim=256, heads=4):
        super().__init__()
        self.stem = _conv_bn(in_ch, 32, 3, 2)
        self.blocks = nn.Sequential(DWBlock(32, 64), DWBlock(64, 128, 2), DWBlock(128, 128),
                                    DWBlock(128, 256, 2), DWBlock(256, 256), DWBlock(256, 384, (2, 1)),
                                    DWBlock(384, 384))
        self.pool = nn.MaxPool2d((3, 1))
        self.embed = nn.Linear(384, dim)
        self.neck = Neck(dim, heads, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))  # (N, 384, 1, T)
        x = self.embed(x.squeeze(2).transpose(1, 2))  # (N, T, dim)
        return torch.softmax(self.head(self.norm(self.neck(x))), dim=-1)


def ocr_recognizer(seed: int = 0) -> nn.Module:
    """Random weights, BatchNorm with non-trivial statistics, eval mode."""
    torch.manual_seed(seed)
    model = OCRRecognizer()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def example_input(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, path: str) -> str:
    """TorchScript exporter (dynamo=False), opset 17, dynamic batch, constant folding."""
    from converters import export_module

    return export_module(model, (example_input(1),), path, exporter="torchscript", dynamic_batch=True)


if __name__ == "__main__":
    m = ocr_recognizer()
    print(sum(p.numel() for p in m.parameters()), tuple(m(example_input(2)).shape))
