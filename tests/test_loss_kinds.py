"""The label-free loss follows each output's kind (METHODS §9): a categorical per position for softmax
outputs (sequences, per-pixel), a Bernoulli per score for sigmoids, the classifier's true Fisher for
plain logits, Gauss-Newton for real values; ``--loss`` overrides; the report says which was used."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from onnx import helper

from converters.onnx_to_torch import TorchGraph
from graphprune.criteria import ScoringContext
from graphprune.curvature.collect import collect
from graphprune.curvature.data import CalibData, LossSpec, resolve_loss
from graphprune.curvature.layers import layer_views
from graphprune.errors import UserError
from tests.helpers import const, ints, make_model, trace_of

N, T, K, C = 6, 5, 4, 7


def seq_model(tail, opset=17, out_shape=("N", T, C), outputs=None, extra_inits=()):
    """x (N,T,K) -> MatMul W (K,C) -> z, then ``tail`` nodes ending in y."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]), *tail]
    return make_model(nodes, [("x", ["N", T, K])], outputs or [("y", list(out_shape))],
                      [const("W", (K, C)), *extra_inits], opset=opset)


def spec_of(model, kind="auto", labels=None, rows=N):
    tr = trace_of(model)
    x = np.random.default_rng(0).standard_normal((rows, *[d for d in tr.input_shapes["x"][1:]])).astype(np.float32)
    return resolve_loss(kind, CalibData({"x": x}, labels, "test"), tr.graph, tr.state)


def conv_model(tail, out_shape):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1]), *tail]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", out_shape)], [const("w", (5, 3, 3, 3)), const("b", (5,))])


# ---------------------------------------------------------------- detection
@pytest.mark.parametrize("name,model,expected", [
    ("softmax last axis", seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=-1)]),
     "categorical(axis=2, probs)"),
    ("opset 11, axis 2", seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=2)], opset=11),
     "categorical(axis=2, probs)"),
    ("opset 11, default axis 1 flattens T x C", seq_model([helper.make_node("Softmax", ["z"], ["y"])], opset=11),
     "categorical(axes=1,2, probs)"),
    ("log-softmax", seq_model([helper.make_node("LogSoftmax", ["z"], ["y"], axis=2)]),
     "categorical(axis=2, log-probs)"),
    ("log of softmax", seq_model([helper.make_node("Softmax", ["z"], ["p"], axis=2),
                                  helper.make_node("Log", ["p"], ["y"])]), "categorical(axis=2, log-probs)"),
    ("transpose after softmax (CTC T x N x C -> N x C x T)",
     seq_model([helper.make_node("Softmax", ["z"], ["p"], axis=-1),
                helper.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 1])], out_shape=("N", C, T)),
     "categorical(axis=1, probs)"),
    ("reshape to (N*T, C) after softmax",
     seq_model([helper.make_node("Softmax", ["z"], ["p"], axis=-1),
                helper.make_node("Reshape", ["p", "shp"], ["y"])], out_shape=(None, C),
               extra_inits=[ints("shp", [-1, C])]), "categorical(axis=1, probs)"),
    ("per-pixel softmax over C of N x C x H x W",
     conv_model([helper.make_node("Softmax", ["z"], ["y"], axis=1)], ["N", 5, 6, 6]), "categorical(axis=1, probs)"),
    ("sigmoid scores", conv_model([helper.make_node("Sigmoid", ["z"], ["y"])], ["N", 5, 6, 6]), "bernoulli(probs)"),
    ("regression map stays Gauss-Newton", conv_model([helper.make_node("Identity", ["z"], ["y"])], ["N", 5, 6, 6]),
     "gauss-newton"),
    ("softmax written out (Exp / ReduceSum / Div): found on the data",
     seq_model([helper.make_node("Exp", ["z"], ["e"]), helper.make_node("ReduceSum", ["e", "ax"], ["s"], keepdims=1),
                helper.make_node("Div", ["e", "s"], ["y"])], extra_inits=[ints("ax", [2])]),
     "categorical(axis=2, probs)"),
])
def test_detects_the_output_kind(name, model, expected):
    assert spec_of(model) == expected, name


def test_plain_logits_classifier_stays_true_fisher_and_labels_win():
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    m = make_model(nodes, [("x", ["N", K])], [("y", ["N", C])], [const("w", (C, K)), const("b", (C,))])
    tr = trace_of(m)
    x = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    assert resolve_loss("auto", CalibData({"x": x}, None, "t"), tr.graph, tr.state) == "true-fisher"
    assert resolve_loss("auto", CalibData({"x": x}, np.zeros(N, np.int64), "t"), tr.graph, tr.state) == "labels"
    # a softmax classifier: labels and the empirical Fisher use log(p), not softmax(p)
    nodes.append(helper.make_node("Softmax", ["y"], ["p"], axis=1))
    m = make_model(nodes, [("x", ["N", K])], [("p", ["N", C])], [const("w", (C, K)), const("b", (C,))])
    tr = trace_of(m)
    assert resolve_loss("auto", CalibData({"x": x}, np.zeros(N, np.int64), "t"), tr.graph, tr.state) == "labels(probs)"
    assert resolve_loss("auto", CalibData({"x": x}, None, "t"), tr.graph, tr.state) == "categorical(axis=1, probs)"


def test_several_outputs_each_by_its_kind():
    tail = [helper.make_node("Softmax", ["z"], ["y"], axis=-1), helper.make_node("Sigmoid", ["z"], ["s"]),
            helper.make_node("Identity", ["z"], ["r"])]
    m = seq_model(tail, outputs=[("y", ["N", T, C]), ("s", ["N", T, C]), ("r", ["N", T, C])])
    spec = spec_of(m)
    assert spec == "y: categorical(axis=2, probs) + s: bernoulli(probs) + r: gauss-newton"
    assert [p.index for p in spec.parts] == [0, 1, 2]
    # the loss is the sum of the three, each by its own kind
    tr = trace_of(m)
    tg = TorchGraph(tr.graph)
    x = torch.randn(N, T, K)
    outs = tg(x=x)
    total = spec.value(outs, None, torch.Generator().manual_seed(0), N)
    from graphprune.curvature.data import part_loss

    gen = torch.Generator().manual_seed(0)
    parts = [part_loss(p, outs[p.index], None, gen, N) for p in spec.parts]
    assert torch.allclose(total, sum(parts))


# ---------------------------------------------------------------- --loss overrides
def test_loss_overrides():
    soft = seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=-1)])
    logits = seq_model([helper.make_node("Identity", ["z"], ["y"])])
    assert spec_of(logits) == "gauss-newton"  # unnormalised N x T x C: nothing says categorical
    assert spec_of(soft, "gauss-newton") == "gauss-newton"
    assert spec_of(soft, "true-fisher") == "categorical(axis=2, probs)"
    assert spec_of(soft, "categorical") == "categorical(axis=2, probs)"
    assert spec_of(logits, "categorical") == "categorical(axis=2, logits)"  # N x T x C: the last axis
    assert spec_of(logits, "categorical:1") == "categorical(axis=1, logits)"
    assert spec_of(logits, "categorical:-1") == "categorical(axis=2, logits)"
    assert spec_of(logits, "bernoulli") == "bernoulli(logits)"
    for bad in ("foo", "categorical:x", "categorical:0", "gauss-newton:2", "labels"):
        with pytest.raises(UserError):
            spec_of(soft, bad)


def test_spec_survives_copy_and_json():
    spec = spec_of(seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=-1)]))
    assert isinstance(spec, LossSpec) and copy.deepcopy(spec).parts == spec.parts
    assert json.loads(json.dumps({"loss": spec})) == {"loss": "categorical(axis=2, probs)"}


# ---------------------------------------------------------------- the per-position true Fisher
def _weight(model):
    from onnx import numpy_helper

    return np.array(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")))


def _fisher_stat(model, x, kind="auto", batch_size=None, seed=0):
    tr = trace_of(model)
    ctx = ScoringContext(tr)
    ctx.views = layer_views(tr.graph, tr.state)
    tg = TorchGraph(tr.graph, trainable=[v.weight for v in ctx.views.values()])
    data = CalibData({"x": x}, None, "test")
    spec = resolve_loss(kind, data, tr.graph, tr.state)
    stats = collect(tg, ctx.views, data, spec, {"fisher_diag"}, batch_size=batch_size or len(x), seed=seed)
    return spec, next(iter(stats.layers.values())).fisher.double().numpy()[:, :K]


@pytest.mark.parametrize("tail,source", [
    ([helper.make_node("Softmax", ["z"], ["y"], axis=-1)], "probs"),
    ([helper.make_node("LogSoftmax", ["z"], ["y"], axis=-1)], "log-probs"),
    ([helper.make_node("Identity", ["z"], ["y"])], "logits"),
])
def test_diag_fisher_equals_per_sample_autograd(tail, source):
    from graphprune.curvature.data import SampleSeeds, _draw_classes

    """Σ_n g_n² with g_n the gradient of sample n's summed cross-entropy over its T positions, each
    position's class drawn from the model's distribution: a per-sample autograd loop with the same draws."""
    model = seq_model(tail)
    x = np.random.default_rng(3).standard_normal((N, T, K)).astype(np.float32)
    spec, fisher = _fisher_stat(model, x, "auto" if source != "logits" else "categorical:2")
    assert spec == f"categorical(axis=2, {source})"
    W = torch.from_numpy(_weight(model)).double()
    xt = torch.from_numpy(x).double()
    logits = xt @ W
    p = torch.softmax(logits, -1)
    # the draws: one stream per sample (seed 0, output 0, sample n), T uniforms, inverse CDF
    y = _draw_classes(p.reshape(-1, C), SampleSeeds(0, range(N)), 0, N).reshape(N, T)
    expected = torch.zeros(C, K, dtype=torch.float64)
    for n in range(N):
        w = W.clone().requires_grad_(True)
        lp = torch.log_softmax(xt[n] @ w, -1)
        (-lp.gather(1, y[n].unsqueeze(1)).sum()).backward()
        expected += w.grad.T ** 2
    np.testing.assert_allclose(fisher, expected.numpy(), rtol=2e-3, atol=1e-6)


def test_per_position_fisher_matches_the_analytic_fisher():
    """Averaged over many samples, Σ_n g_n² approaches E_y[g²] = Σ_t p_tc (1 - p_tc) x_tk² per sample
    (independent positions: the cross terms vanish in expectation)."""
    model = seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=-1)])
    # 16000 samples: the sampled estimate's relative error is then ~2% per entry (4000 gave one entry
    # at 8.3% under another thread count's draws)
    x = np.random.default_rng(4).standard_normal((16000, T, K)).astype(np.float32)
    _, fisher = _fisher_stat(model, x, batch_size=2000)
    W = _weight(model).astype(np.float64)
    z = x.astype(np.float64) @ W
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    analytic = np.einsum("ntc,ntk->ck", p * (1 - p), x.astype(np.float64) ** 2)
    np.testing.assert_allclose(fisher, analytic, rtol=0.08)


def test_bernoulli_fisher_matches_the_analytic_fisher():
    model = seq_model([helper.make_node("Sigmoid", ["z"], ["y"])])
    x = np.random.default_rng(5).standard_normal((16000, T, K)).astype(np.float32)  # ~2% sampling error
    spec, fisher = _fisher_stat(model, x, batch_size=2000)
    assert spec == "bernoulli(probs)"
    W = _weight(model).astype(np.float64)
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ W)))
    analytic = np.einsum("ntc,ntk->ck", s * (1 - s), x.astype(np.float64) ** 2)
    np.testing.assert_allclose(fisher, analytic, rtol=0.08)


# ---------------------------------------------------------------- the report
def test_report_names_the_loss(tmp_path):
    from onnx import save

    from graphprune.pipeline import PruneConfig, prune
    from graphprune.planner import Budget

    H = 12
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    m = make_model(nodes, [("x", ["N", T, K])], [("y", ["N", T, C])], [const("W1", (K, H)), const("W2", (H, C))])
    src = tmp_path / "seq.onnx"
    save(m, str(src))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((16, T, K)).astype(np.float32))
    for loss, expected in (("auto", "categorical(axis=2, probs)"), ("gauss-newton", "gauss-newton")):
        rep = prune(src, tmp_path / f"o_{loss}.onnx",
                    PruneConfig(criterion="fisher", budget=Budget("channels", 0.5), calib=str(tmp_path / "c.npz"),
                                samples=16, loss=loss), report_path=tmp_path / "r.json")
        assert rep["loss"] == expected and rep["verification"]["ok"]
        assert json.loads((tmp_path / "r.json").read_text())["loss"] == expected


# ---------------------------------------------------------------- progress (issue #11 point 5)
def test_statistics_progress_gives_rate_and_eta(monkeypatch, capsys):
    from graphprune import log

    monkeypatch.setattr(log, "_quiet", False)
    model = seq_model([helper.make_node("Softmax", ["z"], ["y"], axis=-1)])
    x = np.random.default_rng(0).standard_normal((40, T, K)).astype(np.float32)
    _fisher_stat(model, x, batch_size=10)
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if "statistics" in ln and "samples/s" in ln]
    assert lines and "ETA" in lines[0] and "10/40 samples" in lines[0]
    # before it, the estimate: memory and a time extrapolated from the first batch
    est = [ln for ln in err if "first batch" in ln]
    assert len(est) == 1 and "over 40 samples" in est[0] and "in all" in est[0] and "B;" in est[0]
    assert "40/40 samples" in lines[-1]
    monkeypatch.setattr(log, "_quiet", True)  # -q
    _fisher_stat(model, x, batch_size=10)
    assert "statistics" not in capsys.readouterr().err
