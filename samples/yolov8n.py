"""A YOLOv8n-sized detector (ultralytics yolov8.yaml at depth 0.33, width 0.25: channels 16-256,
C2f repeats 1/2/2/1, SPPF, the three-level anchor-free Detect head with DFL, 80 classes; ~3.2M
parameters, ~4.4 GMACs at 640x640), built from the ultralytics-style modules in samples/producers.py
with random weights, BatchNorm statistics randomised and then folded into the convs the way
ultralytics' export does. For latency benchmarks at 640 (``benchmarks/speedup.py``):

    graphprune convert samples/yolov8n.py:yolov8n --input-shape 1,3,640,640 -o yolov8n.onnx
"""
from __future__ import annotations

import torch
from torch import nn

from samples.producers import Conv, TinyYOLOv8

WIDTHS = (16, 32, 64, 128, 256)  # yolov8n: 64, 128, 256, 512, 1024 x width multiple 0.25
WIDTHS_S = (32, 64, 128, 256, 512)  # yolov8s: width multiple 0.5 (same depth 0.33; ~11.2M params)


def yolov8n(imgsz: int = 640, nc: int = 80) -> nn.Module:
    """The detector in eval mode with BN folded and Detect's anchors cached for ``imgsz`` (the
    export size; a multiple of 32). Output: [batch, 4 + nc, anchors]."""
    return _detector(WIDTHS, imgsz, nc)


def yolov8s(imgsz: int = 640, nc: int = 80) -> nn.Module:
    """The same detector at YOLOv8s widths (channels 32-512, head class branch 128; ~14 GMACs at
    640x640): the size most deployments of the family use."""
    return _detector(WIDTHS_S, imgsz, nc)


def _detector(widths, imgsz: int, nc: int) -> nn.Module:
    assert imgsz % 32 == 0, imgsz
    torch.manual_seed(0)
    model = TinyYOLOv8(nc=nc, w=widths)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.normal_(0, 0.1, generator=g)
        model.detect.bias_init()
    for m in model.modules():
        if isinstance(m, Conv):
            m.fuse()
    model.eval()
    model.detect.dynamic = False
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))  # dry run: anchors and strides for this size
    return model
