"""Small but structurally real CNN architectures for exercising graphprune.

Every factory returns a randomly initialised ``nn.Module``; :func:`make` seeds the RNG,
gives BatchNorm / InstanceNorm layers non-trivial statistics and affine parameters (so
folding matters) and returns the model in eval mode. Default input: ``INPUT_SHAPE``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)
INPUT_SHAPES: dict[str, tuple[int, ...]] = {}
NUM_CLASSES = 10


def conv_bn(cin, cout, k=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + optional activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Head(nn.Module):
    """Global average pool + Linear classifier."""

    def __init__(self, cin, num_classes=NUM_CLASSES):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, groups=1, width=None):
        super().__init__()
        width = width or planes
        cout = planes * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNetBasic(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=(2, 2, 2)):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = Head(cin)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


class ResNetBottleneck(nn.Module):
    def __init__(self, planes=(16, 32), blocks=(2, 2), groups=1, width_per_group=None):
        super().__init__()
        self.stem = conv_bn(3, 32)
        layers, cin = [], 32
        for i, (p, n) in enumerate(zip(planes, blocks)):
            width = groups * width_per_group * (2**i) if width_per_group else None
            for j in range(n):
                layers.append(Bottleneck(cin, p, 2 if (i > 0 and j == 0) else 1, groups, width))
                cin = p * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = Head(cin)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def resnet_basic() -> nn.Module:
    return ResNetBasic()


def resnet_bottleneck() -> nn.Module:
    return ResNetBottleneck()


def resnext() -> nn.Module:
    """ResNeXt: bottlenecks with grouped 3x3 convs (cardinality 8)."""
    return ResNetBottleneck(planes=(16, 32), blocks=(2, 2), groups=8, width_per_group=4)


# --------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2)]  # t, c, n, s

    def __init__(self):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 1, act=nn.ReLU6)], 32
        for t, c, n, s in self.cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 256, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = Head(256)

    def forward(self, x):
        return self.head(self.features(x))


def mobilenet_v2() -> nn.Module:
    return MobileNetV2()


# --------------------------------------------------------------------------- MobileNetV3
class SqueezeExcite(nn.Module):
    """x * gate(fc2(relu(fc1(avgpool(x))))) with 1x1 convs as the fc layers."""

    def __init__(self, channels, squeeze, gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MBV3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        layers = [conv_bn(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, max(8, (exp // 4 + 4) // 8 * 8)))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV3(nn.Module):
    RE, HS = nn.ReLU, nn.Hardswish
    cfg = [  # k, exp, out, se, act, stride
        (3, 16, 16, True, RE, 2),
        (3, 64, 24, False, RE, 2),
        (3, 72, 24, False, RE, 1),
        (5, 72, 40, True, HS, 2),
        (5, 120, 40, True, HS, 1),
        (3, 120, 48, True, HS, 1),
    ]

    def __init__(self):
        super().__init__()
        layers, cin = [conv_bn(3, 16, 3, 1, act=nn.Hardswish)], 16
        for k, exp, out, se, act, s in self.cfg:
            layers.append(MBV3Block(cin, k, exp, out, se, act, s))
            cin = out
        layers.append(conv_bn(cin, 144, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(144, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v3() -> nn.Module:
    return MobileNetV3()


# --------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(), nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.net(x)], 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, growth=12, blocks=(4, 4, 4), stem=24):
        super().__init__()
        layers, c = [nn.Conv2d(3, stem, 3, padding=1, bias=False)], stem
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i != len(blocks) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = Head(c)

    def forward(self, x):
        return self.head(self.features(x))


def densenet() -> nn.Module:
    return DenseNet()


# --------------------------------------------------------------------------- Inception
class InceptionModule(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pp, 1))
        self.out_channels = c1 + c3 + c5 + pp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32), nn.MaxPool2d(2))
        self.inc1 = InceptionModule(32, 16, 24, 32, 8, 8, 8)  # -> 64
        self.inc2 = InceptionModule(64, 32, 32, 48, 8, 24, 16)  # -> 120
        self.pool = nn.MaxPool2d(2)
        self.head = Head(self.inc2.out_channels)

    def forward(self, x):
        return self.head(self.pool(self.inc2(self.inc1(self.stem(x)))))


def inception() -> nn.Module:
    return Inception()


# --------------------------------------------------------------------------- VGG
class VGG(nn.Module):
    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 64, "M")):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * 4 * 4, 128)  # 32x32 input -> 4x4 after three pools
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


def vgg() -> nn.Module:
    return VGG()


# --------------------------------------------------------------------------- RegNetY
class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=8, se_ratio=0.25):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(1, int(round(cin * se_ratio))), gate=nn.Sigmoid)
        self.c = conv_bn(cout, cout, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.c(self.se(self.b(self.a(x)))) + self.shortcut(x))


class RegNetY(nn.Module):
    def __init__(self, widths=(24, 56, 152), depths=(1, 1, 2)):
        super().__init__()
        layers, cin = [conv_bn(3, 32)], 32
        for w, d in zip(widths, depths):
            for j in range(d):
                layers.append(RegNetYBlock(cin, w, 2 if j == 0 else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = Head(cin)

    def forward(self, x):
        return self.head(self.features(x))


def regnet_se() -> nn.Module:
    return RegNetY()


# --------------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
        b2_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, branch, 1), conv_bn(branch, branch, 3, stride, groups=branch, act=None), conv_bn(branch, branch, 1)
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths=(48, 96, 192), repeats=(2, 3, 2), stem=24, last=256):
        super().__init__()
        layers, cin = [conv_bn(3, stem)], stem
        for w, r in zip(widths, repeats):
            for i in range(r):
                layers.append(ShuffleUnit(cin, w, 2 if i == 0 else 1))
                cin = w
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.head = Head(last)

    def forward(self, x):
        return self.head(self.features(x))


def shufflenet() -> nn.Module:
    return ShuffleNetV2()


# --------------------------------------------------------------------------- SiLU net
class SiLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 16, act=nn.SiLU)
        self.conv2 = conv_bn(16, 32, stride=2, act=nn.SiLU)
        self.res1 = conv_bn(32, 32, act=nn.SiLU)
        self.res2 = conv_bn(32, 32, act=None)
        self.conv3 = nn.Conv2d(32, 64, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.head = Head(64)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        y = self.res2(self.res1(x)) + x
        y = y * torch.sigmoid(y)  # SiLU written out
        z = self.bn3(self.conv3(y))
        z = z * torch.sigmoid(z)
        return self.head(z)


def silu_net() -> nn.Module:
    return SiLUNet()


# --------------------------------------------------------------------------- mixed ops
class MixedOps(nn.Module):
    """A grab-bag of operators a channel pruner must propagate through."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.lrelu = nn.LeakyReLU(0.1)
        self.register_buffer("shift", torch.linspace(-0.2, 0.3, 16).view(16, 1, 1))
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16).view(16, 1, 1))
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3)  # preceded by F.pad(reflect)
        self.prelu = nn.PReLU(num_parameters=32)
        self.split_sizes = (8, 24)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(24, 16, 1)
        self.up = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.keep = 24
        self.conv4 = nn.Conv2d(self.keep, 32, 3, padding=1)
        self.head = Head(32)

    def forward(self, x):
        x = self.lrelu(self.inorm(self.conv1(x)))  # 16 x 32 x 32
        x = (x - self.shift) / self.scale
        x = self.pool(x)  # 16 x 16 x 16
        x = self.prelu(self.conv2(F.pad(x, (1, 1, 1, 1), mode="reflect")))  # 32 x 16 x 16
        a, b = torch.split(x, self.split_sizes, dim=1)
        x = torch.cat([self.conv_a(a), self.conv_b(b)], dim=1)  # 24 x 16 x 16
        x = F.relu(self.bn_up(self.up(x)))  # 16 x 32 x 32
        x = F.relu(self.conv3(x))  # 32 x 16 x 16
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # 32 x 32 x 32
        x = F.relu(self.conv4(x[:, : self.keep]))
        return self.head(x)


def mixed_ops() -> nn.Module:
    return MixedOps()


# --------------------------------------------------------------------------- registry
ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "densenet": densenet,
    "inception": inception,
    "vgg": vgg,
    "resnext": resnext,
    "regnet_se": regnet_se,
    "shufflenet": shufflenet,
    "silu_net": silu_net,
    "mixed_ops": mixed_ops,
}


def input_shape(name: str) -> tuple[int, ...]:
    """Default (batch-1) input shape for a zoo model."""
    return INPUT_SHAPES.get(name, INPUT_SHAPE)


def randomize_norm_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm/InstanceNorm non-trivial running stats and affine params (uses the global RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def make(name: str, seed: int = 0) -> nn.Module:
    """Build zoo model ``name`` with deterministic random weights and norm stats, in eval mode."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    torch.manual_seed(seed)
    model = ZOO[name]()
    randomize_norm_stats(model)
    return model.eval()


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic random input for zoo model ``name``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_shape(name)[1:]), generator=g)
