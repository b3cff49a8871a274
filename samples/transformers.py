"""Small but structurally real transformer architectures for exercising graphprune.

Every factory returns a randomly initialised ``nn.Module``; :func:`make` seeds the RNG, gives
BatchNorm / LayerNorm / RMSNorm layers non-trivial statistics and affine parameters and returns the
model in eval mode. :func:`example_input` gives a deterministic input; :data:`DYNAMIC` lists, per
model, the axes that may be symbolic, as a ``dynamic_axes`` dict (input ``input``, output ``output``);
:func:`export` writes a model with those axes symbolic (``converters.export_module`` only knows a
dynamic batch).

Factories (default input shape in :data:`INPUT_SHAPES`, dynamic axes besides the batch):

* :func:`vit`              timm-style ViT: Conv patch embed, class token, learned pos embed, pre-LN,
                           ONE packed qkv Linear -> (B,T,3,H,D) -> permute(2,0,3,1,4) -> unbind,
                           explicit ``q @ k^T * scale`` / softmax / ``@ v``; (B,3,32,32) -> (B,10).
* :func:`vit_sep`          HF-style ViT: separate q/k/v Linear -> (B,T,H,D).transpose(1,2) and
                           ``F.scaled_dot_product_attention``; (B,3,32,32) -> (B,10).
* :func:`encoder`          BERT-style post-LN ``nn.TransformerEncoder`` (GELU, need_weights=False path)
                           over Linear-embedded features + learned pos embed (sliced to T), mean
                           pool; (B,T=16,F=24) -> (B,10), T dynamic (<= 64).
* :func:`encoder_masked`   same, with a ``src_key_padding_mask`` computed inside from the input
                           (all-zero feature vectors are padding; masked mean pool); T dynamic.
* :func:`mha_need_weights` pre-LN blocks calling ``nn.MultiheadAttention`` with ``need_weights=True``
                           (averaged weights returned, unused), first-token pool; (B,16,24), T dynamic.
* :func:`swin_block`       Swin-style: Conv patch embed to an 8x8 grid, a W-MSA and a shifted SW-MSA
                           block (torch.roll + mask), 4x4 windows, relative-position bias table
                           ((2w-1)^2, H) gathered by a ``relative_position_index`` buffer; (B,3,32,32).
* :func:`gated_mlp`        LLaMA-style: RMSNorm written out (x * rsqrt(mean(x^2) + eps) * w), bias-free
                           attention, gated MLP down(silu(gate(x)) * up(x)); (B,16,24), T dynamic.
* :func:`hybrid_ocr`       CRNN/SVTR-like recogniser: Conv-BN-ReLU stem reducing H 32 -> 1 (W / 4),
                           squeeze to (B,T,C), one pre-LN ``nn.TransformerEncoderLayer``, per-position
                           Linear over 40 classes; (B,3,32,W=128) -> (B,W/4,40), W dynamic (multiple of 4).

Export status (torch 2.13, onnxruntime 1.32; ``python -m samples.transformers`` re-checks it, comparing
onnxruntime with PyTorch, max abs diff < 1e-4, at batch 1 and 3 and at two sequence lengths / widths):

* dynamo exporter (default opset, 20): every model, every axis in :data:`DYNAMIC` symbolic.
* TorchScript exporter (opset 17): every model exports with a dynamic batch, and ``vit``, ``vit_sep``,
  ``swin_block`` and ``gated_mlp`` fully dynamic. Models containing ``nn.MultiheadAttention``
  (``encoder``, ``encoder_masked``, ``mha_need_weights``, ``hybrid_ocr``, and the digits encoder) can NOT
  keep a dynamic sequence length / width: ``F.multi_head_attention_forward`` unpacks
  ``tgt_len, bsz, embed_dim = query.shape`` and the exporter writes ``tgt_len`` as a constant into the
  ``q.view(tgt_len, bsz * heads, head_dim)`` Reshape, so onnxruntime fails at any other length
  (pytorch/pytorch#117209, #122321, #143107). :func:`export` therefore falls back to a static
  sequence length / width (batch still dynamic) for those models under TorchScript
  (:func:`export_dynamic_axes`).
* ``swin_block``: with the default constant folding both exporters pre-compute the relative-position
  bias gather (TorchScript: a (N*N, H) = (256, 2) initializer, then Reshape/Transpose; dynamo: a
  (1, H, N, N) constant); ``export(..., fold_constants=False)`` keeps ``Gather(table (49, 2), index)``.
* dynamo writes ``F.scaled_dot_product_attention`` (``vit_sep``) as Mul(sqrt scale) / MatMul / Softmax at
  its default opset 20 and as the ONNX ``Attention`` op with ``opset=23`` (onnxruntime runs both).
* The TorchScript exporter also cannot export ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
  while their fused "fast path" is active (eval + no_grad: ``aten::_transformer_encoder_layer_fwd`` /
  ``aten::_native_multi_head_attention`` have no ONNX symbolic); :func:`export` switches it off with
  ``torch.backends.mha.set_fastpath_enabled(False)`` for the duration of the export.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
OCR_CLASSES = 40

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "vit": (1, 3, 32, 32),
    "vit_sep": (1, 3, 32, 32),
    "encoder": (1, 16, 24),
    "encoder_masked": (1, 16, 24),
    "mha_need_weights": (1, 16, 24),
    "swin_block": (1, 3, 32, 32),
    "gated_mlp": (1, 16, 24),
    "hybrid_ocr": (1, 3, 32, 128),
}

_BATCH = {0: "batch"}
_SEQ_IN = {"input": {0: "batch", 1: "seq"}, "output": {0: "batch"}}
DYNAMIC: dict[str, dict[str, dict[int, str]]] = {
    "vit": {"input": _BATCH, "output": _BATCH},
    "vit_sep": {"input": _BATCH, "output": _BATCH},
    "encoder": _SEQ_IN,
    "encoder_masked": _SEQ_IN,
    "mha_need_weights": _SEQ_IN,
    "swin_block": {"input": _BATCH, "output": _BATCH},
    "gated_mlp": _SEQ_IN,
    "hybrid_ocr": {"input": {0: "batch", 3: "width"}, "output": {0: "batch", 1: "seq"}},
}
"""``dynamic_axes`` per model: ``{name: {"input"/"output": {axis: dim_name}}}`` (batch included)."""

# (min, max, multiple_of) for the non-batch dynamic dims (dynamo ``dynamic_shapes`` ranges).
DIM_RANGES: dict[str, tuple[int, int, int]] = {"seq": (2, 64, 1), "width": (16, 1024, 4)}
# A second size of every dynamic dim, used by :func:`check`.
SECOND_SIZES: dict[str, int] = {"seq": 9, "width": 64}


# --------------------------------------------------------------------------- building blocks
class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm ``Mlp``)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm ``Attention``: one packed qkv Linear, explicit matmul / softmax attention, proj Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(x)


class SepAttention(nn.Module):
    """HF-style self-attention: separate query/key/value Linears, (B,T,H,D).transpose(1,2), SDPA, out Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t, B, T):
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (self._split(f(x), B, T) for f in (self.query, self.key, self.value))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out(x.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio=2.0, attn: type[nn.Module] = Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- ViT
class ViT(nn.Module):
    """Patch-embed Conv (stride = patch) -> [cls] + tokens + pos embed -> pre-LN blocks -> LN -> head(cls)."""

    def __init__(self, img=32, patch=4, in_ch=3, dim=64, depth=2, heads=4, mlp_ratio=2.0,
                 num_classes=NUM_CLASSES, attn: type[nn.Module] = Attention):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit() -> nn.Module:
    """timm-style ViT, 32x32 image, patch 4 (64 tokens + cls), dim 64, 4 heads, 2 blocks, MLP 128."""
    return ViT()


def vit_tiny() -> nn.Module:
    """DeiT-Tiny sizes (the ViT people ship on edge GPUs): 224x224 image, patch 16 (196 tokens + cls),
    dim 192, 3 heads, 12 blocks, MLP 768, 1000 classes; ~5.7M parameters, ~1.26 GMACs. Random
    weights: for latency benchmarks (``benchmarks/speedup.py``), where compute, not per-op overhead,
    sets the time, unlike the 8x8 digits ViT."""
    return ViT(img=224, patch=16, in_ch=3, dim=192, depth=12, heads=3, mlp_ratio=4.0, num_classes=1000)


def vit_sep() -> nn.Module:
    """HF-style ViT (separate q/k/v, SDPA), same sizes as :func:`vit`."""
    return ViT(attn=SepAttention)


# --------------------------------------------------------------------------- BERT-style encoder
class Encoder(nn.Module):
    """Linear token embedding + learned pos embed (sliced to T) + LN, post-LN ``nn.TransformerEncoder``
    (GELU), mean pool (masked when ``mask_padding``: all-zero input tokens are padding), Linear head."""

    def __init__(self, in_features=24, dim=48, heads=4, depth=2, ffn=96, max_len=64,
                 num_classes=NUM_CLASSES, mask_padding=False):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)
        self.mask_padding = mask_padding

    def forward(self, x):
        T = x.shape[1]
        h = self.embed_norm(self.embed(x) + self.pos_embed[:, :T])
        if not self.mask_padding:
            return self.head(self.encoder(h).mean(1))
        pad = x.abs().sum(-1) == 0  # B, T (True = padding)
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))


def encoder() -> nn.Module:
    """BERT-style post-LN encoder, features 24 -> dim 48, 4 heads, 2 layers, FFN 96; (B,T,24) -> (B,10)."""
    return Encoder()


def encoder_masked() -> nn.Module:
    """:func:`encoder` with a key padding mask (zero feature vectors) and a masked mean pool."""
    return Encoder(mask_padding=True)


# --------------------------------------------------------------------------- MHA need_weights=True
class MHABlock(nn.Module):
    """Pre-LN block on ``nn.MultiheadAttention(batch_first)`` called with need_weights=True."""

    def __init__(self, dim, heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        h = self.norm1(x)
        out, _weights = self.attn(h, h, h, need_weights=True, average_attn_weights=True)
        x = x + out
        return x + self.mlp(self.norm2(x))


class MHANet(nn.Module):
    def __init__(self, in_features=24, dim=32, heads=2, depth=2, max_len=64, num_classes=NUM_CLASSES):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[MHABlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x) + self.pos_embed[:, : x.shape[1]]
        return self.head(self.norm(self.blocks(x))[:, 0])


def mha_need_weights() -> nn.Module:
    """2 pre-LN blocks on nn.MultiheadAttention(need_weights=True), dim 32, 2 heads, first-token pool."""
    return MHANet()


# --------------------------------------------------------------------------- Swin
def window_partition(x, w):
    """(B, H, W, C) -> (B * nW, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows, w, H, W):
    """(B * nW, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(w):
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # 2, w*w
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # w*w, w*w, 2
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Swin W-MSA: packed qkv, relative position bias table ((2w-1)^2, H) gathered per head, optional mask."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.5)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(-1, nW, self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, N, N)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C))


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, resolution, window=4, shift=0, mlp_ratio=2.0):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift:
            H = W = resolution
            img = torch.zeros(1, H, W, 1)
            cnt = 0
            for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                    img[:, hs, ws, :] = cnt
                    cnt += 1
            win = window_partition(img, window).squeeze(-1)  # nW, w*w
            mask = win.unsqueeze(1) - win.unsqueeze(2)
            self.register_buffer("attn_mask", mask.masked_fill(mask != 0, -100.0), persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x):  # B, L, C
        H = W = self.resolution
        B, L, C = x.shape
        h = self.norm1(x).view(B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, self.window), self.attn_mask)
        h = window_reverse(h, self.window, H, W)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class Swin(nn.Module):
    def __init__(self, in_ch=3, patch=4, img=32, dim=32, heads=2, window=4, num_classes=NUM_CLASSES):
        super().__init__()
        res = img // patch
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.patch_norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(SwinBlock(dim, heads, res, window, 0), SwinBlock(dim, heads, res, window, window // 2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))  # B, 64, C
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def swin_block() -> nn.Module:
    """Swin stage: 8x8 token grid (patch 4), dim 32, 2 heads, window 4, W-MSA + shifted SW-MSA block."""
    return Swin()


# --------------------------------------------------------------------------- LLaMA-style gated MLP
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.input_layernorm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = GatedMlp(dim, hidden)

    def forward(self, x):
        B, T, C = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(B, T, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn = F.softmax(attn, dim=-1)
        x = x + self.o_proj(torch.matmul(attn, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.post_attention_layernorm(x))


class GatedMlpNet(nn.Module):
    def __init__(self, in_features=24, dim=48, heads=4, hidden=128, depth=1, num_classes=NUM_CLASSES):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.layers = nn.Sequential(*[LlamaBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.layers(self.embed(x))).mean(1))


def gated_mlp() -> nn.Module:
    """LLaMA-style block (RMSNorm, bias-free attention, SiLU-gated MLP 48 -> 128 -> 48), mean pool."""
    return GatedMlpNet()


# --------------------------------------------------------------------------- hybrid OCR
class HybridOCR(nn.Module):
    """Conv-BN-ReLU stem (H 32 -> 1, W -> W/4), squeeze to (B, T, C), one pre-LN TransformerEncoderLayer,
    per-position Linear over ``num_classes`` (CTC-style N x T x classes logits)."""

    def __init__(self, in_ch=3, dim=64, heads=4, num_classes=OCR_CLASSES):
        super().__init__()
        from samples.zoo import conv_bn

        self.stem = nn.Sequential(
            conv_bn(in_ch, 32, 3, 2),          # 16 x W/2
            conv_bn(32, 48, 3, (2, 1)),        # 8 x W/2
            conv_bn(48, dim, 3, 2),            # 4 x W/4
            conv_bn(dim, dim, 3, (2, 1)),      # 2 x W/4
        )
        self.pool = nn.Conv2d(dim, dim, (2, 1), bias=False)  # 1 x W/4 (learned height collapse)
        self.neck = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.pool(self.stem(x)).squeeze(2).transpose(1, 2)  # B, T, C
        return self.fc(self.norm(self.neck(x)))


def hybrid_ocr() -> nn.Module:
    """CNN stem + 1 transformer layer (dim 64, 4 heads) recogniser; (B,3,32,W) -> (B,W/4,40)."""
    return HybridOCR()


# --------------------------------------------------------------------------- registry
MODELS: dict[str, Callable[[], nn.Module]] = {
    "vit": vit,
    "vit_sep": vit_sep,
    "encoder": encoder,
    "encoder_masked": encoder_masked,
    "mha_need_weights": mha_need_weights,
    "swin_block": swin_block,
    "gated_mlp": gated_mlp,
    "hybrid_ocr": hybrid_ocr,
}
NAMES = tuple(MODELS)


def input_shape(name: str) -> tuple[int, ...]:
    """Default (batch-1) input shape of model ``name``."""
    return INPUT_SHAPES[name]


def randomize_norms(model: nn.Module) -> nn.Module:
    """BatchNorm stats as in ``samples.zoo``; LayerNorm / RMSNorm weights U(0.5, 1.5), biases N(0, 0.2)."""
    from samples.zoo import randomize_norm_stats

    randomize_norm_stats(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.2)
    return model


def make(name: str, seed: int = 0) -> nn.Module:
    """Build model ``name`` with deterministic random weights and norm parameters, in eval mode."""
    if name not in MODELS:
        raise KeyError(f"unknown transformer model {name!r}; available: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = randomize_norms(MODELS[name]())
    model.sample_name = name
    return model.eval()


def example_input(name: str, batch: int = 1, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """Deterministic random input for model ``name``; ``size`` overrides its dynamic sequence length /
    width (default: :data:`INPUT_SHAPES`). For ``encoder_masked`` the last ``b % 3`` tokens of sample
    ``b`` are zeroed (padding)."""
    shape = list(input_shape(name))
    shape[0] = batch
    if size is not None:
        axes = [a for a, d in DYNAMIC[name]["input"].items() if d != "batch"]
        if not axes:
            raise ValueError(f"{name} has no dynamic sequence / width axis")
        shape[axes[0]] = size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if name == "encoder_masked":
        for b in range(batch):
            n = min(b % 3, shape[1] - 1)
            if n:
                x[b, -n:] = 0.0
    return x


# --------------------------------------------------------------------------- export / check
@contextlib.contextmanager
def no_mha_fastpath():
    """Disable the nn.MultiheadAttention / TransformerEncoderLayer fused fast path (TorchScript can't export it)."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def _dynamo_shapes(axes: dict[int, str]) -> dict:
    dims = {}
    for axis, dim in axes.items():
        if dim == "batch":
            dims[axis] = torch.export.Dim("batch", min=1, max=4096)
        else:
            lo, hi, mult = DIM_RANGES[dim]
            if mult == 1:
                dims[axis] = torch.export.Dim(dim, min=lo, max=hi)
            else:
                dims[axis] = mult * torch.export.Dim(f"{dim}_div{mult}", min=lo // mult, max=hi // mult)
    return dims


def uses_torch_mha(module: nn.Module) -> bool:
    """Whether ``module`` contains ``nn.MultiheadAttention`` (alone or inside ``nn.TransformerEncoderLayer``)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in module.modules())


def export_dynamic_axes(module: nn.Module, exporter: str, dynamic_axes: dict, dynamic_seq: bool = True) -> dict:
    """The axes :func:`export` actually makes symbolic: all of ``dynamic_axes`` except that the non-batch
    axes are dropped when ``dynamic_seq`` is false, or for the TorchScript exporter when ``module`` uses
    ``nn.MultiheadAttention`` (whose sequence length that exporter bakes into a Reshape; see module doc)."""
    if dynamic_seq and not (exporter == "torchscript" and uses_torch_mha(module)):
        return dynamic_axes
    return {k: {a: d for a, d in v.items() if d == "batch"} for k, v in dynamic_axes.items()}


def export(module: nn.Module, path: str | os.PathLike, exporter: str = "torchscript", dynamic_seq: bool = True, *,
           name: str | None = None, example: torch.Tensor | None = None, dynamic_axes: dict | None = None,
           opset: int | None = None, fold_constants: bool = True) -> str:
    """Export ``module`` (single input ``input``, single output ``output``) to ONNX at ``path``.

    The batch is always dynamic; with ``dynamic_seq`` so is every other axis in
    ``DYNAMIC[name]`` (sequence length / width), except under TorchScript for modules with
    ``nn.MultiheadAttention``, which fall back to a static length (:func:`export_dynamic_axes`). ``name`` defaults to ``module.sample_name`` (set by
    :func:`make`); pass ``dynamic_axes`` (TorchScript-style, ``{"input": {...}, "output": {...}}``)
    for modules not in :data:`MODELS`. ``exporter``: ``"torchscript"`` (``dynamo=False``, opset 17,
    ``dynamic_axes``) or ``"dynamo"`` (``dynamo=True``, default opset, ``dynamic_shapes``).
    The MHA fast path is disabled during export; the result passes the full ``onnx.checker``.
    """
    import onnx

    name = name or getattr(module, "sample_name", None)
    if dynamic_axes is None:
        if name not in DYNAMIC:
            raise ValueError("pass name= or dynamic_axes= for a module not built by make()")
        dynamic_axes = DYNAMIC[name]
    dynamic_axes = export_dynamic_axes(module, exporter, dynamic_axes, dynamic_seq)
    if example is None:
        example = example_input(name, batch=2)
    path = os.fspath(path)
    module.eval()
    with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, (example,), path, dynamo=False, opset_version=opset or 17,
                              input_names=["input"], output_names=["output"], dynamic_axes=dynamic_axes,
                              do_constant_folding=fold_constants)
        elif exporter == "dynamo":
            kwargs = {"opset_version": opset} if opset else {}
            program = torch.onnx.export(module, (example,), None, dynamo=True, input_names=["input"],
                                        output_names=["output"], dynamic_shapes=(_dynamo_shapes(dynamic_axes["input"]),),
                                        optimize=fold_constants, verbose=False, external_data=False, **kwargs)
            program.save(path, external_data=False)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return path


def op_histogram(path: str) -> dict[str, int]:
    """Op-type counts of an ONNX file (main graph), most frequent first."""
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(path).graph.node).most_common())


def check(name: str, exporter: str, path: str, tol: float = 1e-4) -> dict:
    """Export ``make(name)`` with ``exporter`` to ``path`` and compare onnxruntime with PyTorch at batch 1
    and 3 and at the default and (where it is exported dynamic) :data:`SECOND_SIZES` sequence length / width. Returns a summary dict."""
    import onnxruntime as ort

    model = make(name)
    export(model, path, exporter)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    axes = export_dynamic_axes(model, exporter, DYNAMIC[name])
    dyn = [d for d in axes["input"].values() if d != "batch"]
    sizes = [None] + [SECOND_SIZES[d] for d in dyn]
    worst = 0.0
    for batch, size in [(b, s) for s in sizes for b in (1, 3)]:
        x = example_input(name, batch, seed=1, size=size)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        if out.shape != ref.shape:
            raise AssertionError(f"{name}/{exporter}: shape {out.shape} != {ref.shape}")
        worst = max(worst, float(abs(out - ref).max()))
    if worst >= tol:
        raise AssertionError(f"{name}/{exporter}: max abs diff {worst:.2e} >= {tol}")
    return {"max_abs_diff": worst, "ops": op_histogram(path), "dynamic": axes["input"], "opset": _opset(path)}


def _opset(path):
    import onnx

    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def main(argv=None) -> int:
    """Export every model with both exporters into a temporary folder, check them and print op histograms."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--models", nargs="+", choices=NAMES, default=list(NAMES))
    p.add_argument("--exporters", nargs="+", choices=("torchscript", "dynamo"), default=["torchscript", "dynamo"])
    p.add_argument("--out-dir", default=None, help="keep the .onnx files here (default: a temporary folder)")
    args = p.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or tmp
        os.makedirs(out, exist_ok=True)
        for name in args.models:
            shape = input_shape(name)
            print(f"{name}: input {shape}, dynamic {DYNAMIC[name]}")
            for exporter in args.exporters:
                path = os.path.join(out, f"{name}.{exporter}.onnx")
                try:
                    r = check(name, exporter, path)
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    print(f"  {exporter:11s} FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                    continue
                ops = " ".join(f"{k}:{v}" for k, v in r["ops"].items())
                dims = ",".join(f"{a}:{d}" for a, d in r["dynamic"].items())
                print(f"  {exporter:11s} ok opset {r['opset']} dynamic {dims} maxdiff {r['max_abs_diff']:.1e} "
                      f"{sum(r['ops'].values())} nodes | {ops}")
    return 1 if failures else 0


if __name__ == "__main__":
    # run as a script: put the repo root, not samples/ (whose transformers.py would shadow HF's), on sys.path
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))
    sys.exit(main())
