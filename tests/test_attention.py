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


# --------------------------------------------------------------------------- masks, need_weights=True
class MaskedMHA(nn.Module):
    """nn.MultiheadAttention fed a key padding mask computed from the input (all-zero tokens are
    padding; the module expands it over the heads and adds it to the scores), or called with
    need_weights=True (heads folded into the batch axis up to the merge (T, B*H, D) -> (T*B, E));
    ``return_weights`` makes the head-averaged weights a graph output."""

    def __init__(self, mask: bool, need_weights: bool = False, return_weights: bool = False):
        super().__init__()
        self.mask, self.need_weights, self.return_weights = mask, need_weights, return_weights
        self.emb, self.mha, self.head = nn.Linear(16, C), nn.MultiheadAttention(C, H, batch_first=True), nn.Linear(C, 10)

    def forward(self, x):
        h = self.emb(x)
        pad = x.abs().sum(-1) == 0 if self.mask else None
        o, w = self.mha(h, h, h, key_padding_mask=pad, need_weights=self.need_weights or self.return_weights)
        y = self.head((h + o).mean(1))
        return (y, w) if self.return_weights else y


class ExpandedMask(nn.Module):
    """Explicit attention with a padding mask ``expand``-ed over the heads (no fold); ``return_mask``
    also makes the expanded mask a graph output."""

    def __init__(self, return_mask: bool = False):
        super().__init__()
        self.return_mask = return_mask
        self.emb, self.qkv, self.proj, self.head = nn.Linear(16, C), nn.Linear(C, 3 * C), nn.Linear(C, C), nn.Linear(C, 10)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.emb(x)
        q, k, v = self.qkv(h).reshape(b, t, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        m = ((x.abs().sum(-1) == 0).float() * -1e4).view(b, 1, 1, t).expand(-1, H, -1, -1)
        a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5 + m).softmax(-1) @ v
        y = self.head((h + self.proj(a.transpose(1, 2).reshape(b, t, C))).mean(1))
        return (y, m) if self.return_mask else y


MASK_MODELS = {  # name: (factory, sequence length dynamic under TorchScript?)
    "padding_mask": (lambda: MaskedMHA(mask=True), False),
    "need_weights": (lambda: MaskedMHA(mask=False, need_weights=True), False),
    "weights_output": (lambda: MaskedMHA(mask=False, return_weights=True), False),
    "expanded_mask": (lambda: ExpandedMask(), True),
    "expanded_mask_output": (lambda: ExpandedMask(return_mask=True), True),
}


@pytest.fixture(scope="session")
def mask_model(tmp_path_factory):
    """mask_model(name, exporter, length=T) -> path, exported once per session. TorchScript bakes the
    sequence length of nn.MultiheadAttention into a Reshape: those files are exported per length."""
    from samples.transformers import no_mha_fastpath

    d = tmp_path_factory.mktemp("masks")
    cache: dict = {}

    def get(name: str, exporter: str, length: int = T) -> str:
        key = (name, exporter, length)
        if key not in cache:
            factory, dynamic_t = MASK_MODELS[name]
            torch.manual_seed(0)
            m = factory().eval()
            path = str(d / f"{name}_{exporter}_{length}.onnx")
            x = torch.randn(2, length, 16)
            with no_mha_fastpath(), torch.no_grad():
                if exporter == "dynamo":
                    dims = {0: torch.export.Dim("B", min=1, max=64), 1: torch.export.Dim("T", min=2, max=64)}
                    torch.onnx.export(m, (x,), path, dynamo=True, dynamic_shapes={"x": dims}, verbose=False)
                else:
                    axes = {0: "B", 1: "T"} if dynamic_t else {0: "B"}
                    torch.onnx.export(m, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": axes})
            cache[key] = path
        return cache[key]

    return get


def _padded(batch: int, length: int) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((batch, length, 16)).astype(np.float32)
    for b in range(batch):  # sample b ends in b padding tokens
        if b:
            x[b, -b:] = 0.0
    return x


def _prune_heads_and_check(path: str, length: int, check_lengths) -> dict:
    """Prune with a channel budget (verified by graphprune at its sizes; returns that verification),
    then independently remove heads 0 and 2 and compare with the masked original on inputs with
    padding tokens at ``check_lengths``."""
    import onnxruntime as ort

    from graphprune.pipeline import load_and_trace
    from graphprune.rewriter import apply_plan, masked_original

    name = onnx.load(path, load_external_data=False).graph.input[0].name
    report = prune(path, path[:-5] + "_p.onnx", PruneConfig(budget=Budget("channels", 0.5),
                                                           input_shapes={name: [1, length, 16]}))
    head_group = next(g for g in report["groups"] if g["size"] == H and g["prunable"])
    assert head_group["kept"] == H // 2
    v = report["verification"]
    assert v["ok"], v
    skeleton, tr = load_and_trace(path, {name: [1, length, 16]})
    heads = [g for g in tr.groups if g.prunable and g.size == H]
    assert len(heads) == 1
    removed = tr.removed_roots({heads[0].id: np.array([0, 2])})
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (masked_original(tr, removed, skeleton), apply_plan(tr, removed, skeleton))]
    for t in check_lengths:
        x = _padded(3, t)
        ref, got = (s.run(None, {name: x})[0] for s in sessions)
        assert got.shape == (3, 10) and np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    return v


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["padding_mask", "need_weights", "expanded_mask"])
def test_masked_and_need_weights_heads_prune(mask_model, name, exporter):
    """A padding mask expanded over the heads (rewritten to broadcast: every head sees the same
    mask) and need_weights=True (heads merged back from the batch axis): heads prune, at two lengths."""
    if exporter == "dynamo" or MASK_MODELS[name][1]:  # one file, verified at two lengths
        path = mask_model(name, exporter)
        v = _prune_heads_and_check(path, T, (T, 11))
        name_in = onnx.load(path, load_external_data=False).graph.input[0].name
        assert len({s[name_in][1] for s in v["sizes"]}) == 2, v
    else:  # TorchScript bakes the length of nn.MultiheadAttention in: one file per length
        for t in (T, 11):
            _prune_heads_and_check(mask_model(name, exporter, t), t, (t,))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_head_averaged_weights_as_output_keep_heads(mask_model, exporter):
    """The mean over heads of the attention weights changes when heads go: heads stay whole."""
    path = mask_model("weights_output", exporter)
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    info = inspect(path, {name: [1, T, 16]})
    heads = [g for g in info["groups"] if g["size"] == H and g["channels_per_unit"] > 1]
    assert len(heads) == 1 and not heads[0]["prunable"]
    assert any("ReduceMean" in r for r in heads[0]["frozen"]), heads[0]["frozen"]


def test_expanded_mask_read_elsewhere_keeps_heads(mask_model):
    """A mask expanded over the heads that is also a graph output keeps its head count: heads freeze."""
    path = mask_model("expanded_mask_output", "torchscript")
    info = inspect(path, {"x": [1, T, 16]})
    heads = [g for g in info["groups"] if g["size"] == H and g["channels_per_unit"] > 1]
    assert len(heads) == 1 and not heads[0]["prunable"]
    assert any("attention mask" in r for r in heads[0]["frozen"]), heads[0]["frozen"]


@pytest.mark.parametrize("pattern", [(True, False, "torchscript"), (False, True, "dynamo"), (None, False, "dynamo")],
                         ids=_id)
def test_latency_model_times_the_attention_matmuls(attention_models, pattern, tmp_path, monkeypatch):
    """--round-to auto and --keep-latency rank by measured time: the two MatMuls of activations per
    attention (scores and their product with V; no weight, so no width grid) are timed at full size
    and scale with the kept heads, so removing a head saves their share too (without them a head
    looked cheaper than it is and auto kept heads that unrounded plans remove)."""
    from graphprune import latency
    from graphprune.cost import CostModel
    from graphprune.latency import LatencyTable, layer_spec, pair_spec
    from graphprune.stages.load import load_and_trace

    path = attention_models[pattern]
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    _, tr = load_and_trace(path, {name: [1, T, 16]})
    timed = [L for L in tr.state.layers if layer_spec(tr, L) is not None]
    pairs = [L for L in tr.state.layers if layer_spec(tr, L) is None and pair_spec(tr, L) is not None]
    assert len(pairs) == 2 and all(L.out_size == H for L in pairs)
    table = LatencyTable("cpu", batch=2, cache=tmp_path / "lat.json", threads=1)
    cm = CostModel(tr)
    assert cm.add_latency(table) == len(timed) + 2
    pair_ms = sum(table.pair_ms(pair_spec(tr, L)) for L in pairs)
    assert pair_ms > 0 and sum(1 for k in table.cache if "|pair|" in k) == 2
    (head,) = [g for g in tr.groups if g.prunable and g.size == H]
    with_pairs = -cm.delta(head.units[:1], "latency")
    monkeypatch.setattr(latency, "pair_spec", lambda trace, layer: None)
    without = CostModel(tr)
    assert without.add_latency(table) == len(timed)
    assert with_pairs - -without.delta(head.units[:1], "latency") == pytest.approx(pair_ms / H, rel=1e-9)
    table.save()
    again = LatencyTable("cpu", batch=2, cache=tmp_path / "lat.json", threads=1)
    monkeypatch.undo()
    assert CostModel(tr).add_latency(again) == len(timed) + 2 and again.measured == 0  # cached


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "dynamo-opset23"])
def test_three_heads_of_separate_projections_are_heads_not_packed_parts(exporter, tmp_path):
    """HF-style attention with exactly three heads (DeiT-Tiny's count): the q/k/v Reshapes to
    (B, T, 3, D) have the shape of nn.MultiheadAttention's packed (T, B, 3, E) split, but they go
    on to attention, not to a Gather of the parts, so each of the three is a head and prunes
    (they used to be taken as packed parts and froze every head at the QK^T MatMul)."""
    from graphprune.pipeline import PruneConfig, inspect, prune
    from graphprune.planner import Budget
    from samples import transformers as TS

    path = str(tmp_path / "sep3.onnx")
    kind, _, opset = exporter.partition("-opset")
    TS.export(TS.ViT(attn=TS.SepAttention, heads=3, dim=48), path, exporter=kind, name="vit_sep",
              **({"opset": int(opset)} if opset else {}))
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    info = inspect(path, {name: [1, 3, 32, 32]})
    heads = [g for g in info["groups"] if g["channels_per_unit"] == 16]
    assert len(heads) == 2 and all(g["prunable"] and g["size"] == 3 for g in heads), info["groups"]
    rep = prune(path, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5, best_effort=True),
                                                       input_shapes={name: [1, 3, 32, 32]}))
    assert rep["verification"]["ok"], rep["verification"]
    assert any(g["channels_per_unit"] == 16 and g["kept"] < g["size"] for g in rep["groups"])


class _GQA(torch.nn.Module):
    """Llama-style grouped-query attention: hq query heads over hkv key/value heads, SDPA with
    enable_gqa (the dynamo exporter repeats k and v by Unsqueeze -> Expand -> Reshape)."""

    def __init__(self, hq: int, hkv: int, d: int = 8):
        super().__init__()
        self.hq, self.hkv, self.d = hq, hkv, d
        self.q, self.k, self.v = (torch.nn.Linear(16, h * d) for h in (hq, hkv, hkv))
        self.o = torch.nn.Linear(hq * d, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.hq, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, t, self.hq * self.d))


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 2)])
@pytest.mark.parametrize("opset", [None, 23])
def test_grouped_query_attention_prunes_kv_groups(hq, hkv, opset, tmp_path):
    """The dynamo exporter's GQA (default opset: k/v repeated by Expand + Reshape; opset 23: the
    Attention op): a unit is a kv head with the q heads that read it; removing one shrinks q by
    hq/hkv heads and k, v by one head; verified against the masked original at a second length.
    (4, 2) also checks a shared constant 2 that is both the kv head count and the repeat factor."""
    from graphprune.pipeline import PruneConfig, inspect, prune
    from graphprune.planner import Budget

    torch.manual_seed(0)
    path = str(tmp_path / "gqa.onnx")
    dims = ({0: torch.export.Dim("B"), 1: torch.export.Dim("T")},)
    torch.onnx.export(_GQA(hq, hkv).eval(), (torch.randn(2, 5, 16),), path, dynamo=True, dynamic_shapes=dims,
                      **({"opset_version": opset} if opset else {}))
    name = onnx.load(path).graph.input[0].name
    info = inspect(path, {name: [1, 5, 16]})
    (g,) = [g for g in info["groups"] if g["prunable"]]
    assert g["size"] == hkv, info["groups"]
    rep = prune(path, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5, best_effort=True),
                                                       input_shapes={name: [1, 5, 16]}))
    assert rep["verification"]["ok"], rep["verification"]
    assert any(sz[name][1] != 5 for sz in rep["verification"]["sizes"])  # a second length
    kept = sorted(tuple(i.dims) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer if len(i.dims) == 2)
    g_q = hq // hkv
    assert kept == sorted([(16, g_q * 8), (16, 8), (16, 8), (g_q * 8, 16)]), kept
