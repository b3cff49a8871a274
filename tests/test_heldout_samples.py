"""The held-out sample networks (samples/heldout.py) as shipped: accuracy, structure, prunability."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphprune.calib import load_labelled, load_npz
from graphprune.pipeline import inspect

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
NAMES = ("mobilenet_v2", "densenet", "regnet_se")
TEST_DATA = SAMPLES / "heldout_test.npz"
CALIB_DATA = SAMPLES / "heldout_calib.npz"


def _stated_accuracies() -> dict[str, float]:
    """heldout_<name> -> accuracy (fraction) from the module docstring's "Measured" lines."""
    doc = ast.get_docstring(ast.parse((SAMPLES / "heldout.py").read_text()))
    found = re.findall(r"^\s*heldout_(\w+)\s+(\d+\.\d+)%", doc, flags=re.M)
    return {name: float(pct) / 100 for name, pct in found}


def _model(name: str) -> Path:
    return SAMPLES / f"heldout_{name}.onnx"


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def test_data_files_match_loaders():
    model = onnx.load(str(_model("densenet")))
    feeds, labels = load_labelled(model, TEST_DATA)
    assert feeds["input"].shape == (497, 3, 32, 32) and feeds["input"].dtype == np.float32
    assert len(labels) == 497 and set(labels.tolist()) == set(range(10))
    calib = load_npz(CALIB_DATA)
    assert calib["input"].shape == (256, 3, 32, 32) and calib["input"].dtype == np.float32
    assert load_labelled(model, CALIB_DATA)[1].shape == (256,)


@pytest.mark.parametrize("name", NAMES)
def test_accuracy_as_stated(name):
    stated = _stated_accuracies()
    assert name in stated, f"samples/heldout.py's docstring states no accuracy for heldout_{name}"
    data = np.load(TEST_DATA)
    sess = ort.InferenceSession(str(_model(name)), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("input", "output")
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    acc = float((sess.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())
    assert acc >= 0.95
    assert acc == pytest.approx(stated[name], abs=1e-3)


def test_densenet_keeps_batchnorm():
    ops = [n.op_type for n in onnx.load(str(_model("densenet"))).graph.node]
    assert ops.count("BatchNormalization") >= 12  # pre-activation BNs cannot fold into a conv


def test_regnet_has_sigmoid_gated_se():
    model = onnx.load(str(_model("regnet_se")))
    prod = _producers(model)
    gated = [n for n in model.graph.node if n.op_type == "Mul"
             and any(i in prod and prod[i].op_type == "Sigmoid" for i in n.input)]
    assert len(gated) == 5  # one SE per block


@pytest.mark.parametrize("name", NAMES)
def test_inspect_finds_prunable_groups(name):
    info = inspect(_model(name))
    assert info["prunable_groups"] > 0 and info["prunable_channels"] > 0
    assert info["macs"] > 0
