"""The transformer sample zoo (samples/transformers.py) pruned from both exporters' files: every
model verifies against the masked original (at a second sequence length/width where the export
is dynamic), MACs match an independent count, and heads prune where graphprune recognises them."""
from __future__ import annotations

import onnx
import pytest

from graphprune.pipeline import PruneConfig, inspect, prune
from graphprune.planner import Budget
from samples import transformers
from tests.macs import count_macs

EXPORTERS = ("torchscript", "dynamo")
#: models whose attention heads are prunable units from both exporters (mha_need_weights: its
#: head-averaged attention weights are unused, so heads prune; they would stay whole if they were
#: an output, tests/test_attention.py)
HEADS_BOTH = ("vit", "vit_sep", "swin_block", "hybrid_ocr", "encoder", "encoder_masked", "mha_need_weights")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", transformers.NAMES)
def test_transformer_sample_prunes_and_verifies(transformer_model, tmp_path, name, exporter):
    path = transformer_model(name, exporter)
    x = transformers.example_input(name, 1, 0)
    iname = onnx.load(path, load_external_data=False).graph.input[0].name
    size = {iname: list(x.shape)}
    info = inspect(path, size)
    assert info["macs"] == pytest.approx(count_macs(path, {iname: tuple(x.shape)}), rel=1e-9)
    heads = [g for g in info["groups"] if g["prunable"] and g["size"] <= 8 and g["channels_per_unit"] > 1]
    if name in HEADS_BOTH:
        assert heads, [(g["size"], g["frozen"]) for g in info["groups"]]
    report = prune(path, tmp_path / "p.onnx", PruneConfig(budget=Budget("channels", 0.5), input_shapes=size))
    v = report["verification"]
    assert v["ok"] and v["max_rel_error"] <= 1e-4, v
    assert report["totals"]["macs_ratio"] < 0.95
    dynamic = [d for d in onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
               if not d.HasField("dim_value")]
    if dynamic:
        assert len({tuple(s[iname][1:]) for s in v["sizes"]}) == 2, v["sizes"]
