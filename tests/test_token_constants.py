"""Constants that join the residual stream of a transformer: a class token expanded over the batch
and concatenated along the tokens, a learned positional embedding added whole, sliced to the
sequence length, or gathered by position. They are sliced with the stream's channels, so a stream
without LayerNorm prunes (checked against the masked original at two sequence lengths, both
exporters), and a stream under LayerNorm/RMSNorm is one group frozen for that reason."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

from graphprune.pipeline import PruneConfig, inspect, prune
from graphprune.planner import Budget

C, T_MAX = 24, 32


class TokenNet(nn.Module):
    """Linear token embedding, optional class token, positional embedding (``pos``: "slice" adds
    ``pos[:, :T]``, "gather" adds ``table[arange(T)]``), two residual MLPs, optional LayerNorm."""

    def __init__(self, cls: str | None, pos: str, norm: bool):
        super().__init__()
        self.cls_mode, self.pos_mode, self.norm = cls, pos, nn.LayerNorm(C) if norm else None
        self.emb = nn.Linear(16, C)
        self.cls = nn.Parameter(torch.randn(1, 1, C)) if cls else None
        if pos == "gather":
            self.table = nn.Embedding(T_MAX + 1, C)
        else:
            self.pos = nn.Parameter(torch.randn(1, T_MAX + 1, C))
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(C, 32), nn.GELU(), nn.Linear(32, C)) for _ in range(2))
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        h = self.emb(x)
        if self.cls_mode == "expand":  # timm: cls_token.expand(B, -1, -1)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        elif self.cls_mode == "explicit":  # the channel count written into the expand shape
            h = torch.cat([self.cls.expand(h.shape[0], 1, C), h], dim=1)
        t = h.shape[1]
        if self.pos_mode == "gather":
            h = h + self.table(torch.arange(t))
        else:
            h = h + self.pos[:, :t]
        for f in self.fc:
            h = h + f(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h[:, 0] if self.cls_mode else h.mean(1))


def _export(model: nn.Module, exporter: str, path) -> str:
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 6, 16)
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("B", min=1, max=8), 1: torch.export.Dim("T", min=2, max=T_MAX - 1)}
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes={"x": dims}, verbose=False,
                          external_data=False)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "B", 1: "T"}})
    return str(path)


def _stream(info: dict) -> dict:
    """The group of the token embedding's output channels (the residual stream)."""
    return next(g for g in info["groups"] if g["size"] == C)


VARIANTS = [("expand", "slice"), (None, "slice"), (None, "gather"), ("expand", "gather")]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("cls,pos", VARIANTS)
def test_class_token_and_positional_embedding_prune_with_the_stream(tmp_path, exporter, cls, pos):
    torch.manual_seed(1)
    path = _export(TokenNet(cls, pos, norm=False), exporter, tmp_path / "m.onnx")
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    size = {name: [1, 6, 16]}
    stream = _stream(inspect(path, size))
    assert stream["prunable"], stream["frozen"]
    rep = prune(path, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5), input_shapes=size))
    v = rep["verification"]
    assert v["ok"] and v["max_rel_error"] <= 1e-4, v
    assert len({s[name][1] for s in v["sizes"]}) >= 2, v["sizes"]  # checked at a second sequence length
    kept = next(g for g in rep["groups"] if g["size"] == C)["kept"]
    assert kept < C
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    widths = {tuple(i.dims) for i in pruned.graph.initializer}
    if cls:  # the class token shrank with the stream
        assert (1, 1, kept) in widths, sorted(widths)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stream_under_layernorm_is_one_group_frozen_for_the_norm(tmp_path, exporter):
    path = _export(TokenNet("expand", "slice", norm=True), exporter, tmp_path / "m.onnx")
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    info = inspect(path, {name: [1, 6, 16]})
    streams = [g for g in info["groups"] if g["size"] == C]
    assert len(streams) == 1, [(g["size"], g["frozen"]) for g in info["groups"]]
    assert not streams[0]["prunable"] and streams[0]["frozen"][0].startswith("LayerNormalization over the channels")
    mlps = [g for g in info["groups"] if g["size"] == 32]
    assert len(mlps) == 2 and all(g["prunable"] for g in mlps)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_class_token_expanded_to_a_written_width_freezes_or_verifies(tmp_path, exporter):
    """cls.expand(B, 1, C) writes C into the expand shape: slicing the token alone would break the
    Expand, so the stream must either stay whole or be rewritten correctly; never a wrong graph."""
    path = _export(TokenNet("explicit", "slice", norm=False), exporter, tmp_path / "m.onnx")
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    size = {name: [1, 6, 16]}
    rep = prune(path, tmp_path / "p.onnx",
                PruneConfig(budget=Budget("channels", 0.7, best_effort=True), input_shapes=size))
    assert rep["verification"]["ok"], rep["verification"]
