"""Attention heads as prunable units, exported by both PyTorch exporters with a dynamic sequence length.

Patterns: one packed qkv Linear reshaped to (B, T, 3, H, D) (timm), separate q/k/v Linears reshaped
to (B, T, H, D) and transposed (HF), each with explicit softmax(QK^T)V and with
``scaled_dot_product_attention``. A unit is a whole head (its Q/K/V rows and biases, its block of
output-projection columns); pruning is checked against the masked original at two sequence
lengths, and MACs (activation x activation MatMuls included) against an independent count from
onnxruntime's shapes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from graphprune.pipeline import PruneConfig, inspect, prune
from graphprune.planner import Budget
from tests.macs import count_macs

C, H, T = 32, 4, 6


class Attention(nn.Module):
    def __init__(self, packed: bool, sdpa: bool):
        super().__init__()
        self.packed, self.sdpa = packed, sdpa
        if packed:
            self.qkv = nn.Linear(C, 3 * C)
        else:
            self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        b, t, c = x.shape
        d = c // H
        if self.packed:
            q, k, v = self.qkv(x).reshape(b, t, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (f(x).view(b, t, H, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Embedding, one pre-norm-free attention block with residual, an MLP, mean-pooled classifier."""

    def __init__(self, packed: bool, sdpa: bool):
        super().__init__()
        self.emb = nn.Linear(16, C)
        self.attn = Attention(packed, sdpa)
        self.fc1, self.fc2, self.head = nn.Linear(C, 64), nn.Linear(64, C), nn.Linear(C, 10)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(h)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def export(packed: bool, sdpa: bool, exporter: str, path) -> str:
    torch.manual_seed(0)
    m = (MHABlock() if packed is None else Block(packed, sdpa)).eval()
    x = torch.randn(2 if exporter == "dynamo" else 1, T, 16)  # torch.export specialises a batch of 1
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("B", min=1, max=64), 1: torch.export.Dim("T", min=2, max=64)}
        with torch.no_grad():  # nn.MultiheadAttention's fast path is not exportable
            torch.onnx.export(m, (x,), str(path), dynamo=True, dynamic_shapes={"x": dims}, verbose=False)
    else:
        torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "B", 1: "T"}})
    return str(path)


class MHABlock(nn.Module):
    """nn.MultiheadAttention (packed in-projection, heads folded into the batch axis)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mha, self.head = nn.Linear(16, C), nn.MultiheadAttention(C, H, batch_first=True), nn.Linear(C, 10)

    def forward(self, x):
        h = self.emb(x)
        return self.head((h + self.mha(h, h, h, need_weights=False)[0]).mean(1))


PATTERNS = [  # (packed, sdpa, exporter); packed None: nn.MultiheadAttention
    (True, False, "torchscript"), (True, False, "dynamo"),
    (False, False, "torchscript"), (False, False, "dynamo"),
    (True, True, "torchscript"), (False, True, "torchscript"),
    (True, True, "dynamo"), (False, True, "dynamo"),  # dynamo folds K into (B*H, T, D) and back
    (None, False, "dynamo"),
]


def _id(p):
    if p[0] is None:
        return f"multiheadattention-{p[2]}"
    return f"{'packed' if p[0] else 'separate'}-{'sdpa' if p[1] else 'explicit'}-{p[2]}"


@pytest.fixture(scope="session")
def attention_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("attention")
    return {p: export(*p, d / f"{_id(p)}.onnx") for p in PATTERNS}


@pytest.mark.parametrize("pattern", PATTERNS, ids=_id)
def test_heads_are_units_and_macs_count_attention(attention_models, pattern):
    path = attention_models[pattern]
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    if pattern[2] == "dynamo":  # torch writes the weights as external data: loaded into the graph
        assert __import__("os").path.exists(path + ".data")
    for t in (T, 11):
        info = inspect(path, {name: [1, t, 16]})
        assert info["macs"] == pytest.approx(count_macs(path, {name: (1, t, 16)}), rel=1e-9)
    heads = [g for g in info["groups"] if g["prunable"] and g["size"] == H]
    assert len(heads) == 1, info["groups"]
    # channels of one unit in the group's first source: q, k and v rows of a head for a packed
    # projection, the q rows for separate ones
    assert heads[0]["channels_per_unit"] == (3 * C // H if pattern[0] in (True, None) else C // H)


@pytest.mark.parametrize("pattern", PATTERNS, ids=_id)
def test_head_removal_matches_the_masked_original_at_two_lengths(attention_models, pattern, tmp_path):
    path = attention_models[pattern]
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    out = tmp_path / "p.onnx"
    report = prune(path, out, PruneConfig(budget=Budget("channels", 0.5), input_shapes={name: [1, T, 16]}))
    head_group = next(g for g in report["groups"] if g["size"] == H and g["prunable"])
    assert head_group["kept"] == H // 2  # half of the heads removed
    v = report["verification"]
    assert v["ok"] and len({s[name][1] for s in v["sizes"]}) == 2, v  # two sequence lengths
    # the pruned model runs at yet another length and batch
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {name: np.random.default_rng(0).standard_normal((3, 17, 16)).astype(np.float32)})[0]
    assert y.shape == (3, 10) and np.isfinite(y).all()
    size = {name: (1, 9, 16)}
    assert report["totals"]["macs_ratio"] == pytest.approx(
        count_macs(str(out), {name: (1, T, 16)}) / count_macs(path, {name: (1, T, 16)}), rel=1e-9)
    assert count_macs(str(out), size) < count_macs(path, size)


def test_keep_flops_lands_on_the_independent_count(attention_models, tmp_path):
    path = attention_models[(True, False, "torchscript")]
    out = tmp_path / "p.onnx"
    report = prune(path, out, PruneConfig(budget=Budget("flops", 0.6), input_shapes={"x": [1, 32, 16]}))
    ratio = count_macs(str(out), {"x": (1, 32, 16)}) / count_macs(path, {"x": (1, 32, 16)})
    assert ratio <= 0.6 * 1.02 and abs(ratio - report["totals"]["macs_ratio"]) < 1e-9


def test_a_shape_computation_shared_by_two_layers_is_copied_per_layer(tmp_path):
    """The dynamo exporter computes B*H once for every nn.MultiheadAttention layer of an encoder:
    rewriting it for one layer's kept heads would change the other's, so each further layer gets
    its own copy of that computation and both layers' heads prune independently."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, C), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(C, H, 64, batch_first=True, dropout=0.0), 2)).eval()
    path = tmp_path / "enc.onnx"
    with torch.no_grad():
        torch.onnx.export(enc, (torch.randn(2, T, 16),), str(path), dynamo=True, verbose=False,
                          dynamic_shapes={"input": {0: torch.export.Dim("B", min=1, max=64),
                                                    1: torch.export.Dim("T", min=2, max=64)}})
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    info = inspect(str(path), {name: [1, T, 16]})
    heads = [g for g in info["groups"] if g["size"] == H]
    assert len(heads) == 2 and all(g["prunable"] for g in heads), heads
    report = prune(str(path), tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5),
                                                                input_shapes={name: [1, T, 16]}))
    v = report["verification"]
    assert v["ok"] and len({s[name][1] for s in v["sizes"]}) == 2, v
    assert [g["kept"] for g in report["groups"] if g["size"] == H] == [H // 2, H // 2]


def test_static_length_encoder_with_dynamic_batch(tmp_path):
    """Dynamo export with a fixed sequence length: the shape constants are initializers and heads are
    folded as (T, -1, D); the pruned model must still run at every batch (a folded axis has no fixed
    size, it is not written into the shapes)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, C), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(C, H, 64, batch_first=True, dropout=0.0), 2)).eval()
    path = tmp_path / "enc_static_t.onnx"
    with torch.no_grad():
        torch.onnx.export(enc, (torch.randn(2, T, 16),), str(path), dynamo=True, verbose=False,
                          dynamic_shapes={"input": {0: torch.export.Dim("B", min=1, max=64)}})
    info = inspect(str(path))
    assert [g["prunable"] for g in info["groups"] if g["size"] == H] == [True, True]
    out = tmp_path / "p.onnx"
    report = prune(str(path), out, PruneConfig(budget=Budget("channels", 0.5)))
    assert report["verification"]["ok"] and report["verification"]["batches"] == [1, 3]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((b, T, 16), np.float32)})[0].shape == (b, T, C)
