"""WoodFisher with fixed-size diagonal blocks (issue #14): whole-row blocks reproduce the dense
per-row inverse; blocked scores, WoodTaylor and their compensation against brute force; the memory
estimate of a ResNet-18-sized layer list; the CLI with --block-size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

import graphprune.curvature.collect as C
from converters.onnx_to_torch import TorchGraph
from graphprune.criteria import ScoringContext, make_criterion
from graphprune.curvature.collect import block_layout, collect, default_block_size, estimate_bytes
from graphprune.curvature.compensate import compensate
from graphprune.curvature.data import CalibData
from graphprune.curvature.layers import LayerView, layer_views
from graphprune.runtime import run
from tests.test_criteria import arr, convnet, hidden_group, mlp, with_w2
from tests.helpers import load_via_file, make_model, record_gauss_newton_draws, trace_of


def stats(model, x, labels, loss, needs, block_size, damping=1e-3, batch_size=16):
    tr = trace_of(model)
    ctx = ScoringContext(tr)
    ctx.views = layer_views(tr.graph, tr.state)
    tg = TorchGraph(tr.graph, trainable=[n for v in ctx.views.values() for n in (v.weight, v.bias) if n])
    ctx.stats = collect(tg, ctx.views, CalibData({"x": x}, labels, "test"), loss, needs, batch_size=batch_size,
                        damping=damping, block_size=block_size)
    return tr, ctx


def canonical(ctx, view, values=None):
    """(out, cols + 1): the weight and the constant input's column (a bias-free layer's is zero)."""
    t = ctx.trace.graph.tensors()
    values = values or {}
    w = np.asarray(values.get(view.weight, t[view.weight].values))
    b = np.asarray(values.get(view.bias, t[view.bias].values)) if view.bias else np.zeros(view.out)
    return torch.as_tensor(view.canonical(w, b), dtype=torch.float64)


def mlp_nobias():
    """x -> Gemm -> Relu -> Gemm without a bias: the hidden group is consumed by a bias-free layer."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    inits = [arr("w1", rng.standard_normal((8, 5))), arr("b1", rng.standard_normal(8) * 0.3 + 0.5),
             arr("w2", rng.standard_normal((5, 8)))]
    return load_via_file(make_model(nodes, [("x", ["N", 5])], [("y", ["N", 5])], inits))


# ------------------------------------------------ whole-row blocks = the dense per-row inverse
@pytest.fixture(scope="module", params=["convnet", "mlp-nobias"])
def conv_stats(request):
    """convnet (grouped conv, a bias-free depthwise conv, a Gemm) or an MLP whose hidden group feeds
    a bias-free Gemm, with the per-sample gradients each layer's Woodbury update saw, recorded on the
    side."""
    recorded: dict[int, list[torch.Tensor]] = {}
    orig = C._Accumulator._woodbury

    def spy(self, st, gs, *a, **k):
        recorded.setdefault(id(st), []).append(gs.detach().to(torch.float64).clone())
        return orig(self, st, gs, *a, **k)

    C._Accumulator._woodbury = spy
    try:
        rng = np.random.default_rng(11)
        shape = (48, 3, 6, 5) if request.param == "convnet" else (48, 5)
        x = rng.standard_normal(shape).astype(np.float32)
        labels = rng.integers(0, 5, 48)
        model = convnet() if request.param == "convnet" else mlp_nobias()
        out = {}
        for block in (None, 10**6):
            tr, ctx = stats(model, x, labels, "labels", {"woodfisher"}, block)
            grads = {n: torch.cat(recorded.pop(id(st))) for n, st in ctx.stats.layers.items()}
            out[block] = (tr, ctx, grads)
    finally:
        C._Accumulator._woodbury = orig
    return out


def dense_row_inverses(ctx, grads):
    """The row-wise implementation's math: F_r⁻¹ = (λI + (1/m) Σ_n g_nr g_nrᵀ)⁻¹ for every row r,
    over the row augmented with the constant input (for every layer, bias-free ones included: the
    row-block version did so, and dropping it for bias-free layers cost the digits DenseNet 3-5
    points at 30% MACs, see collect.block_layout)."""
    out = {}
    for node, G in grads.items():
        st = ctx.stats.layers[node]
        assert G.shape[2] == ctx.views[node].cols + 1
        m = G.shape[0]
        F = torch.einsum("nri,nrj->rij", G, G) / m + st.lam * torch.eye(G.shape[2], dtype=torch.float64)
        out[node] = torch.linalg.inv(F)
    return out


def reference_scores(ctx, finv):
    """Structured OBS per row with the dense per-row inverse (the pre-blocks implementation)."""
    res = {}
    for g in ctx.trace.groups:
        if not g.prunable:
            continue
        s = torch.zeros(g.size, dtype=torch.float64)
        for view, rows, cols in ctx.layer_units(g):
            F = finv[view.node]
            W = canonical(ctx, view)
            if rows is not None:
                rho = 0.5 * (W * torch.linalg.solve(F, W.unsqueeze(-1)).squeeze(-1)).sum(1)
                for i, u in enumerate(rows.tolist()):
                    if u >= 0:
                        s[u] += rho[i]
            if cols is not None:
                for u in range(g.size):
                    idx = torch.as_tensor(np.nonzero(cols == u)[0])
                    if len(idx):
                        H = F[:, idx][:, :, idx]
                        w = W[:, idx]
                        s[u] += 0.5 * (w * torch.linalg.solve(H, w.unsqueeze(-1)).squeeze(-1)).sum()
        res[g.id] = s.numpy()
    return res


@pytest.mark.parametrize("block", [None, 10**6])
def test_whole_row_blocks_equal_dense_per_row_inverse(conv_stats, block):
    tr, ctx, grads = conv_stats[block]
    finv = dense_row_inverses(ctx, grads)
    for node, st in ctx.stats.layers.items():
        assert st.blocks.nb == 1 and st.finv.dtype == torch.float64
        # λ as the per-row implementation estimated it: damping × mean g² of the first 8 samples
        assert st.lam == pytest.approx(1e-3 * float(grads[node][:8].pow(2).mean()), rel=1e-9)
        ref = finv[node]
        np.testing.assert_allclose(st.finv.double().numpy(), ref.numpy(), rtol=2e-3, atol=2e-4 * float(ref.abs().max()))
    scores = make_criterion("woodfisher").score(ctx)
    ref = reference_scores(ctx, finv)
    assert scores.keys() == ref.keys() and len(ref) >= (2 if len(ctx.views) > 2 else 1)
    for gid in ref:
        np.testing.assert_allclose(scores[gid], ref[gid], rtol=2e-3)
    # compensation: δw_r = −F_r⁻¹[:,J] ([F_r⁻¹]_JJ)⁻¹ w_r,J in every consumer, as before
    for g in (g for g in tr.groups if g.prunable):
        removed = {int(u) for u in g.units[:2]}
        upd = compensate(ctx, tr.kept_fn(removed), "woodfisher")
        assert upd
        for node, view in ctx.views.items():
            if view.weight not in upd:
                continue
            W = canonical(ctx, view)
            col_units = next((cols for v, _, cols in ctx.layer_units(g) if v.node == node and cols is not None))
            J = torch.as_tensor(np.nonzero(np.isin(col_units, [tr.unit_pos[r] for r in removed]))[0])
            F = finv[node]
            x = torch.linalg.solve(F[:, J][:, :, J], W[:, J].unsqueeze(-1))
            expect = W - torch.bmm(F[:, :, J], x).squeeze(-1)
            expect[:, J] = 0
            got = canonical(ctx, view, upd)
            kept = slice(None) if view.bias else slice(0, view.cols)  # a bias-free layer's constant: dropped
            np.testing.assert_allclose(got[:, kept].numpy(), expect[:, kept].numpy(), rtol=0,
                                       atol=1e-2 * float(W.abs().max()))
            if view.bias is None:
                assert np.all(got[:, view.cols].numpy() == 0)


def test_block_layout_aligns_on_input_channels():
    conv = LayerView("c", "Conv", "w", "b", 1, 4, 64 * 9, 9)  # 3x3 conv, 64 inputs, with a bias
    lay = block_layout(conv, 128)
    assert max(lay.sizes) <= 128 and sum(lay.sizes) == 64 * 9 + 1
    assert all(s % 9 == 0 for s in lay.starts)  # cuts between input channels only
    assert lay.nb == 5 and max(lay.sizes) - min(lay.sizes) <= 9  # fewest blocks, balanced
    assert block_layout(conv, 577).nb == 1 and block_layout(conv, None).nb == 1
    small = block_layout(conv, 4)  # a channel does not fit: single weights
    assert max(small.sizes) <= 4 and sum(small.sizes) == 577
    nobias = LayerView("g", "Gemm", "w", None, 1, 3, 10, 1)  # the constant input's column all the same
    assert block_layout(nobias, 4).sizes == (4, 3, 4) and block_layout(nobias, None).length == 11


# ----------------------------------------------- blocked scores and compensation vs brute force
@pytest.fixture(scope="module")
def fitted_small():
    """Hidden layer random, output layer fitted by least squares (as in test_criteria): the
    Gauss-Newton loss is quadratic in the output layer, its Fisher is E[h hᵀ] per output row."""
    rng = np.random.default_rng(7)
    n, k, hdim, o = 3000, 6, 10, 4
    x = rng.standard_normal((n, k)).astype(np.float32)
    w1, b1 = rng.standard_normal((hdim, k)), rng.standard_normal(hdim) * 0.5
    h = np.maximum(x.astype(np.float64) @ w1.T + b1, 0)
    w2, b2 = rng.standard_normal((o, hdim)), rng.standard_normal(o)
    return dict(model=mlp(w1, b1, w2, b2), x=x, h=h, w2=w2, b2=b2, hdim=hdim)


def test_blocked_scores_and_compensation_match_brute_force(fitted_small):
    """Blocks of 4 weights (the 11-wide rows split [4 | 3 | 3+bias]): removing hidden unit c is
    compensated only inside its block B, so the true loss change is ½ Σ_r w_rc² / [A_B⁻¹]_cc."""
    f = fitted_small
    tr, ctx = stats(f["model"], f["x"], None, "gauss-newton", {"woodfisher"}, 4, damping=1e-6, batch_size=500)
    g = hidden_group(tr)
    view = next(v for v in ctx.views.values() if v.weight == "w2")
    lay = ctx.stats.layers[view.node].blocks
    assert lay.sizes == (4, 3, 4)
    haug = np.concatenate([f["h"], np.ones((len(f["h"]), 1))], 1)
    A = haug.T @ haug / len(haug)
    blk, _ = lay.locate()
    truth, pruned = np.zeros(f["hdim"]), np.zeros(f["hdim"])
    dense = run(f["model"], {"x": f["x"]})[0].astype(np.float64)
    order = [int(tr.unit_pos[tr.roots[i]]) for i in tr.state.infos["h"].ids]  # unit of hidden channel c
    for c in range(f["hdim"]):
        B = np.nonzero(blk == blk[c])[0]
        j = list(B).index(c)
        truth[c] = 0.5 * np.sum(f["w2"][:, c] ** 2) / np.linalg.inv(A[np.ix_(B, B)])[j, j]
        # measured: compensate the removal, run the model with the hidden unit's column zeroed
        upd = compensate(ctx, tr.kept_fn({int(tr.roots[tr.state.infos["h"].ids[c]])}), "woodfisher")
        m = with_w2(f["model"], upd["w2"])
        for init in m.graph.initializer:
            if init.name == "b2":
                init.CopyFrom(numpy_helper.from_array(upd["b2"].astype(np.float32), "b2"))
        pruned[c] = 0.5 * np.mean(np.sum((run(m, {"x": f["x"]})[0] - dense) ** 2, 1))
    crit = make_criterion("woodfisher")
    (v, _, cols), = [lu for lu in ctx.layer_units(g) if lu[2] is not None]
    est = crit.cols(ctx, v, crit.weights(ctx, v), cols, g.size).numpy()[order]
    np.testing.assert_allclose(est, truth, rtol=0.25)  # sampled Gauss-Newton Fisher ≈ A
    np.testing.assert_allclose(pruned, truth, rtol=0.25)  # the update reaches the block's optimum
    full = 0.5 * np.sum(f["w2"] ** 2, 0) * np.mean(f["h"] ** 2, 0)  # no compensation at all
    assert np.all(pruned <= full * 1.05) and np.mean(pruned) < 0.9 * np.mean(full)


def test_woodtaylor_is_the_constrained_minimum_of_the_quadratic_model():
    """WoodTaylor score and update against a brute-force KKT solve of min ḡᵀδ + ½δᵀFδ, δ_Q = −w_Q,
    per block, with the blocks' own F and ḡ (labels loss: the mean gradient is not zero)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 3, 6, 5)).astype(np.float32)
    tr, ctx = stats(convnet(), x, rng.integers(0, 5, 40), "labels", {"woodfisher", "woodtaylor"}, 12)
    crit = make_criterion("woodtaylor")
    g = next(g for g in tr.groups if g.prunable and any(c is not None for _, _, c in ctx.layer_units(g)))
    scores = crit.score(ctx)[g.id]
    expect = np.zeros(g.size)
    keep_rows = {}
    u0 = int(tr.unit_pos[g.units[0]])
    for view, rows, cols in ctx.layer_units(g):
        st = ctx.stats.layers[view.node]
        lay = st.blocks
        W = canonical(ctx, view)[:, :lay.length]
        gbar = st.gsum.double() / st.n
        idx, valid = lay.index()
        Finv = st.finv.double().reshape(view.out, lay.nb, lay.cb, lay.cb)
        for u in range(g.size):
            for r in range(view.out):
                for b in range(lay.nb):
                    real = idx[b][valid[b]]
                    if rows is not None and rows[r] == u:
                        Q = np.arange(len(real))  # the whole block goes
                    elif cols is not None:
                        Q = np.nonzero(np.append(cols, -1)[real.numpy()] == u)[0]  # (the bias: no unit)
                    else:
                        continue
                    if not len(Q):
                        continue
                    F = torch.linalg.inv(Finv[r, b][:len(real), :len(real)])
                    gb, wb = gbar[r, real], W[r, real]
                    R = np.setdiff1d(np.arange(len(real)), Q)
                    d = torch.zeros(len(real), dtype=torch.float64)
                    d[Q] = -wb[Q]
                    if len(R):
                        d[R] = -torch.linalg.solve(F[R][:, R], gb[R] + F[R][:, Q] @ d[Q])
                    dl = gb @ d + 0.5 * d @ F @ d
                    expect[u] += float(dl + 0.5 * gb @ torch.linalg.solve(F, gb))
                    if cols is not None and u == u0 and rows is None:
                        keep_rows.setdefault(view.node, {})[(r, b)] = (real, d)
    np.testing.assert_allclose(scores, expect, rtol=1e-3)
    # the woodtaylor update of a consumer losing unit 0 moves its touched blocks by the same δ
    upd = compensate(ctx, tr.kept_fn({int(g.units[0])}), "woodtaylor")
    for node, blocks in keep_rows.items():
        view = ctx.views[node]
        before, after = canonical(ctx, view), canonical(ctx, view, upd)
        for (r, b), (real, d) in blocks.items():
            own = real < (view.cols + 1 if view.bias else view.cols)  # a bias-free layer drops its constant
            np.testing.assert_allclose((after[r, real[own]] - before[r, real[own]]).numpy(), d[own].numpy(),
                                       rtol=1e-3, atol=1e-4 * float(before.abs().max()))


def test_woodtaylor_matches_the_loss_change_of_its_update(monkeypatch):
    """Against brute force: with the Gauss-Newton targets the statistics drew (recorded), the loss is
    exactly quadratic in the output layer, with Hessian A = E[r̃ r̃ᵀ] per output row (r̃: the hidden
    units and the constant) and a gradient ḡ that is not zero (the sampled targets' noise; the output
    layer is scaled down so that it matters). Removing hidden unit c with the woodtaylor update, the
    loss measured in onnxruntime equals the exact minimum over the unit's block (KKT with A and ḡ);
    the score is that plus the Newton gain ½ ḡ_Bᵀ A_B⁻¹ ḡ_B; woodfisher's update, which ignores ḡ,
    does worse."""

    rng = np.random.default_rng(1)
    n, k, hdim, o = 3000, 6, 10, 4
    x = rng.standard_normal((n, k)).astype(np.float32)
    w1, b1 = rng.standard_normal((hdim, k)), rng.standard_normal(hdim) * 0.5
    w2, b2 = rng.standard_normal((o, hdim)) * 0.03, rng.standard_normal(o) * 0.1
    model = mlp(w1, b1, w2, b2)
    drawn = record_gauss_newton_draws(monkeypatch)
    tr, ctx = stats(model, x, None, "gauss-newton", {"woodfisher", "woodtaylor"}, 4, damping=1e-6, batch_size=500)
    dense = run(model, {"x": x})[0].astype(np.float64)
    target = dense + np.concatenate(drawn)

    def loss(out):
        return 0.5 * np.mean(np.sum((out - target) ** 2, 1))

    haug = np.concatenate([np.maximum(x.astype(np.float64) @ w1.T + b1, 0), np.ones((n, 1))], 1)
    A = haug.T @ haug / n
    W = np.concatenate([w2, b2[:, None]], 1)
    G = (dense - target).T @ haug / n  # the exact gradient of the output layer (o, hdim + 1)
    g = hidden_group(tr)
    view = next(v for v in ctx.views.values() if v.weight == "w2")
    blk, _ = ctx.stats.layers[view.node].blocks.locate()
    truth, gain = np.zeros(hdim), np.zeros(hdim)
    measured = {"woodtaylor": np.zeros(hdim), "woodfisher": np.zeros(hdim)}
    for c in range(hdim):
        B = np.nonzero(blk == blk[c])[0]
        q = list(B).index(c)
        R = [i for i in range(len(B)) if i != q]
        AB = A[np.ix_(B, B)]
        for r in range(o):
            gb, wb = G[r, B], W[r, B]
            d = np.zeros(len(B))
            d[q] = -wb[q]
            d[R] = -np.linalg.solve(AB[np.ix_(R, R)], gb[R] + AB[R, q] * d[q])
            truth[c] += gb @ d + 0.5 * d @ AB @ d
            gain[c] += 0.5 * gb @ np.linalg.solve(AB, gb)
        for method, out in measured.items():
            upd = compensate(ctx, tr.kept_fn({int(tr.roots[tr.state.infos["h"].ids[c]])}), method)
            m = with_w2(model, upd["w2"])
            for init in m.graph.initializer:
                if init.name == "b2":
                    init.CopyFrom(numpy_helper.from_array(upd["b2"].astype(np.float32), "b2"))
            out[c] = loss(run(m, {"x": x})[0].astype(np.float64)) - loss(dense)
    scale = np.abs(truth).max()
    assert np.sum(truth < 0) >= 3  # the gradient term decides here: removal with the update gains
    np.testing.assert_allclose(measured["woodtaylor"], truth, rtol=0.05, atol=0.02 * scale)
    crit = make_criterion("woodtaylor")
    (v, _, cols), = [lu for lu in ctx.layer_units(g) if lu[2] is not None]
    order = [int(tr.unit_pos[tr.roots[i]]) for i in tr.state.infos["h"].ids]
    est = crit.cols(ctx, v, crit.weights(ctx, v), cols, g.size).numpy()[order]
    np.testing.assert_allclose(est, truth + gain, rtol=0.1, atol=0.05 * scale)  # sampled Fisher ≈ A
    assert np.all(measured["woodfisher"] > measured["woodtaylor"])


# --------------------------------------------------------------------- memory of a ResNet-18
def resnet18_views() -> dict[str, LayerView]:
    """The 21 convs and the fc of a ResNet-18 (BN folded: every conv has a bias)."""
    shapes = [(64, 3, 7)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            shapes += [(cout, cin, 3), (cout, cout, 3)]
            if i == 0 and (stride != 1 or cin != cout):
                shapes.append((cout, cin, 1))
            cin = cout
    views = {f"conv{i}": LayerView(f"conv{i}", "Conv", f"w{i}", f"b{i}", 1, o, c * k * k, k * k)
             for i, (o, c, k) in enumerate(shapes)}
    views["fc"] = LayerView("fc", "Gemm", "wfc", "bfc", 1, 1000, 512, 1)
    return views


def test_memory_estimate_with_blocks_fits_resnet18():
    views = resnet18_views()
    params = sum(v.out * (v.cols + 1) for v in views.values())
    assert 11.6e6 < params < 11.8e6
    needs = {"woodfisher"}
    per_row = sum(estimate_bytes(views, needs, weights_shared=True).values())
    assert per_row > 100 * 2**30  # the per-row inverses (out·in'², float32) are out of reach
    for limit, least in ((4 * 2**30, 12), (8 * 2**30, 32), (2**40, C.DEFAULT_MAX_BLOCK)):
        c = default_block_size(views, needs, limit, weights_shared=True)
        need = sum(estimate_bytes(views, needs, weights_shared=True, block_size=c).values())
        # half the limit for the statistics, half for the activations the estimate does not count
        assert need <= limit // 2 and least <= c <= C.DEFAULT_MAX_BLOCK
        if c < C.DEFAULT_MAX_BLOCK:  # about 4 bytes per weight and block slot: twice the block won't do
            assert sum(estimate_bytes(views, needs, weights_shared=True, block_size=2 * c).values()) > limit // 2
    # a limit below the half rule still gets the largest block that fits it; none at all: 1 (refused)
    one = sum(estimate_bytes(views, needs, weights_shared=True, block_size=1).values())
    c = default_block_size(views, needs, int(1.5 * one), weights_shared=True)
    assert c >= 1 and sum(estimate_bytes(views, needs, weights_shared=True, block_size=c).values()) <= 1.5 * one
    assert default_block_size(views, needs, 2**20, weights_shared=True) == 1


# ------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("criterion", ["woodfisher", "woodtaylor"])
def test_cli_prune_with_block_size_verifies(criterion, tmp_path, monkeypatch, capsys):
    import json

    from graphprune import log
    from graphprune.cli import main

    monkeypatch.setattr(log, "_quiet", False)  # progress on: the small-block hint is checked below

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    from graphprune.pipeline import PruneConfig

    quick = ["--recover", "0"] if "recover" in PruneConfig.__dataclass_fields__ else []  # no distillation
    rc = main(["prune", "samples/digits_resnet.onnx", "-o", str(out), "--keep-flops", "0.6", "--criterion",
               criterion, "--calib", "samples/digits_calib.npz", "--samples", "16", "--block-size", "64",
               "--report", str(rep), "--compensate", "woodfisher", *quick])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["block_size"] == 64 and report["compensation"] == "woodfisher"
    # blocks of 64 weights on rows of 577 (64 input channels x 3x3 + 1): the user is told what that costs
    assert "compensated only within its block" in capsys.readouterr().err
    assert report["verification"]["ok"] and report["totals"]["macs_ratio"] <= 0.6 + 1e-9
    assert main(["verify", "samples/digits_resnet.onnx", str(out), "--report", str(rep)]) == 0


@pytest.mark.parametrize("block", [5, 12])
def test_block_inverses_are_exact(block, monkeypatch):
    """Every block's Woodbury inverse (updates split to at most max(8, c) samples) equals the dense
    inverse of λI + (1/m) Σ g_b g_bᵀ from the same per-sample gradients."""
    seen: dict[int, list[torch.Tensor]] = {}
    queue = C._Accumulator._queue

    def spy(self, st, gs, last):
        seen.setdefault(id(st), []).append(gs.double().clone())
        return queue(self, st, gs, last)

    monkeypatch.setattr(C._Accumulator, "_queue", spy)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 3, 6, 5)).astype(np.float32)
    _, ctx = stats(convnet(), x, rng.integers(0, 5, 40), "labels", {"woodfisher"}, block, batch_size=20)
    for st in ctx.stats.layers.values():
        G = torch.cat(seen[id(st)])  # (m, out, L)
        lay = st.blocks
        Gb = lay.gather(G.reshape(-1, G.shape[2])).reshape(G.shape[0], -1, lay.cb)
        F = torch.einsum("nbi,nbj->bij", Gb, Gb) / G.shape[0] + st.lam * torch.eye(lay.cb, dtype=torch.float64)
        ref = torch.linalg.inv(F)
        assert float((st.finv - ref).abs().max()) < 1e-8 * float(ref.abs().max())
