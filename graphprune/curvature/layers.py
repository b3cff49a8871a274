"""A uniform view of Conv/Gemm/MatMul layers: W as (out × in') with the im2col input patches.

Conventions (METHODS §4): rows = output channels, columns = in' = (in/groups)·kh·kw taps in
channel-major order (a conv weight reshaped to (M, -1)); the bias is the extra last column with a
constant input of 1. Grouped convolutions share one input factor over their groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..rules.base import attr, input_or_none


@dataclass
class LayerView:
    node: str
    op: str
    weight: str
    bias: str | None
    groups: int
    out: int  # M
    cols: int  # in' per group (without bias)
    taps: int  # kh*kw (1 for Gemm/MatMul)
    conv: dict | None = None  # kernel/stride/pad/dilation for Conv
    trans_b: bool = True  # Gemm/MatMul weight stored as (out, in)?
    alpha: float = 1.0

    # ---- weights -------------------------------------------------------------------
    def canonical(self, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """(out, cols [+1]) float64 with the bias as last column when given."""
        W = w.reshape(self.out, -1) if self.op == "Conv" else (w if self.trans_b else w.T)
        W = np.asarray(W, dtype=np.float64)
        if b is not None:
            W = np.concatenate([W, np.asarray(b, dtype=np.float64).reshape(-1, 1) * np.ones((self.out, 1))], axis=1)
        return W

    def split(self, W: np.ndarray, w_like: np.ndarray, has_bias: bool):
        """Inverse of canonical: (weight in its ONNX layout, bias or None)."""
        Wm, b = (W[:, :-1], W[:, -1]) if has_bias else (W, None)
        if self.op == "Conv":
            w = Wm.reshape(w_like.shape)
        else:
            w = Wm if self.trans_b else Wm.T
        return w.astype(w_like.dtype), b

    def col_channel(self) -> np.ndarray:
        """For each canonical column: the index along the weight's input-channel axis."""
        return np.repeat(np.arange(self.cols // self.taps), self.taps)

    # ---- activations -----------------------------------------------------------------
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input patches a: (N, groups, cols, T)."""
        if self.op != "Conv":
            a = x * self.alpha if self.alpha != 1.0 else x
            a = a.reshape(a.shape[0], -1, a.shape[-1]) if a.dim() > 2 else a.unsqueeze(1)  # (N, T, K)
            return a.transpose(1, 2).unsqueeze(1)
        c = self.conv
        nd = len(c["kernel"])
        if nd == 1:
            x = x.unsqueeze(2)
        pads = c["pads"]
        if nd == 1:
            pad = (pads[0], pads[1])
        else:
            pad = (pads[1], pads[3], pads[0], pads[2])
        k = c["kernel"] if nd == 2 else (1, c["kernel"][0])
        s = c["strides"] if nd == 2 else (1, c["strides"][0])
        d = c["dilations"] if nd == 2 else (1, c["dilations"][0])
        n = x.shape[0]
        if tuple(k) == (1, 1):  # 1x1: the patches are the (strided) input itself, no im2col copy
            if any(pad):
                x = F.pad(x, pad)
            return x[:, :, ::s[0], ::s[1]].reshape(n, self.groups, self.cols, -1)
        if len(pad) == 4 and pad[0] == pad[1] and pad[2] == pad[3]:  # symmetric: unfold pads itself
            cols = F.unfold(x, k, dilation=d, padding=(pad[2], pad[0]), stride=s)  # (N, C*kh*kw, T)
        else:
            cols = F.unfold(F.pad(x, pad) if any(pad) else x, k, dilation=d, stride=s)
        return cols.reshape(n, self.groups, self.cols, cols.shape[2])

    def out_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradients ds: (N, groups, out/groups, T)."""
        n = g.shape[0]
        if self.op != "Conv":
            g = g.reshape(n, -1, g.shape[-1]).transpose(1, 2) if g.dim() > 2 else g.unsqueeze(2)
            return g.unsqueeze(1)
        return g.reshape(n, self.groups, self.out // self.groups, -1)


def layer_views(graph, state) -> dict[str, LayerView]:
    """Views of every Conv/Gemm/MatMul with constant weights that curvature can be computed for."""
    views: dict[str, LayerView] = {}
    nodes = {n.name: n for n in graph.nodes}
    for layer in state.layers:
        node = nodes[layer.node]
        w = state.const(node.inputs[1])
        if w is None:
            continue
        b_t = input_or_none(node, 2)
        bias = b_t.name if b_t is not None and state.const(b_t) is not None else None
        if node.op == "Conv":
            nd = w.ndim - 2
            pads = list(attr(node, "pads", [0] * (2 * nd)))
            auto = attr(node, "auto_pad", "NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            if auto not in ("NOTSET", "VALID") or nd > 2:
                continue  # SAME padding / 3-D convs: no curvature (their members score 0)
            g = int(attr(node, "group", 1))
            views[node.name] = LayerView(
                node.name, "Conv", node.inputs[1].name, bias, g, w.shape[0], int(np.prod(w.shape[1:])),
                int(np.prod(w.shape[2:])),
                conv={"kernel": tuple(w.shape[2:]), "pads": pads,
                      "strides": tuple(attr(node, "strides", [1] * nd)),
                      "dilations": tuple(attr(node, "dilations", [1] * nd))})
        elif node.op == "Gemm":
            if int(attr(node, "transA", 0)):
                continue
            tb = bool(int(attr(node, "transB", 0)))
            c = state.const(b_t) if b_t is not None else None
            if c is not None and c.size not in (w.shape[0 if tb else 1],):
                bias = None  # scalar / 2-D C: not a per-output bias
            out = w.shape[0] if tb else w.shape[1]
            views[node.name] = LayerView(node.name, "Gemm", node.inputs[1].name, bias, 1, out,
                                         w.shape[1] if tb else w.shape[0], 1, trans_b=tb,
                                         alpha=float(attr(node, "alpha", 1.0)))
        elif node.op == "MatMul" and w.ndim == 2:
            views[node.name] = LayerView(node.name, "MatMul", node.inputs[1].name, None, 1, w.shape[1],
                                         w.shape[0], 1, trans_b=False)
    return views
