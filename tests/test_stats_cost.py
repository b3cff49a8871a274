"""Statistics the chosen method does not read are not computed (issue #11 point 2), and what is
computed stays what it was."""
from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from converters.onnx_to_torch import TorchGraph
from graphprune.criteria import ScoringContext
from graphprune.curvature.collect import collect
from graphprune.curvature.data import CalibData
from graphprune.curvature.layers import layer_views
from tests.helpers import const, make_model, trace_of


def _model():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["g"], pads=[1, 1, 1, 1], group=2),
             helper.make_node("GlobalAveragePool", ["g"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    m = make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", 5])],
                   [const("w1", (8, 3, 3, 3)), const("b1", (8,)), const("w2", (8, 4, 3, 3)), const("w3", (5, 8)),
                    const("b3", (5,))])
    return m


def _stats(m, needs, x):
    tr = trace_of(m)
    ctx = ScoringContext(tr)
    ctx.views = layer_views(tr.graph, tr.state)
    tg = TorchGraph(tr.graph, trainable=[n for v in ctx.views.values() for n in (v.weight, v.bias) if n])
    return collect(tg, ctx.views, CalibData({"x": x}, None, "t"), "true-fisher", needs, batch_size=7).layers


def test_input_factor_only():
    x = np.random.default_rng(0).standard_normal((20, 3, 6, 6)).astype(np.float32)
    m = _model()
    full, a_only = _stats(m, {"kfac"}, x), _stats(m, {"kfac_a"}, x)
    for name, st in full.items():
        assert a_only[name].S is None and st.S is not None
        torch.testing.assert_close(a_only[name].A, st.A)
        assert a_only[name].a_count == st.a_count and a_only[name].n == st.n
        if st.Ag is not None:
            torch.testing.assert_close(a_only[name].Ag, st.Ag)
    assert any(st.Ag is not None for st in full.values())


def test_patches_without_im2col_copies_are_the_same():
    """1x1 convs read the (strided, padded) input directly and symmetric pads go to unfold: the
    patches equal F.pad + F.unfold exactly."""
    import torch.nn.functional as F

    from graphprune.curvature.layers import LayerView

    def reference(v, x):
        c = v.conv
        nd = len(c["kernel"])
        if nd == 1:
            x = x.unsqueeze(2)
        p = c["pads"]
        pad = (p[0], p[1]) if nd == 1 else (p[1], p[3], p[0], p[2])
        x = F.pad(x, pad)
        k = c["kernel"] if nd == 2 else (1, c["kernel"][0])
        s = c["strides"] if nd == 2 else (1, c["strides"][0])
        d = c["dilations"] if nd == 2 else (1, c["dilations"][0])
        cols = F.unfold(x, k, dilation=d, stride=s)
        return cols.reshape(cols.shape[0], v.groups, v.cols, cols.shape[2])

    gen = torch.Generator().manual_seed(0)
    cases = [((1, 1), [0, 0, 0, 0], (1, 1), (1, 1), 1), ((1, 1), [0, 0, 0, 0], (2, 2), (1, 1), 1),
             ((1, 1), [1, 0, 1, 0], (2, 1), (1, 1), 2), ((3, 3), [1, 1, 1, 1], (1, 1), (1, 1), 1),
             ((3, 3), [1, 1, 1, 1], (2, 2), (2, 2), 4), ((3, 3), [0, 1, 1, 2], (1, 2), (1, 1), 1),
             ((1, 3), [0, 1, 0, 1], (1, 1), (1, 1), 4), ((1,), [0, 0], (2,), (1,), 1), ((3,), [1, 2], (1,), (1,), 2)]
    for k, pads, s, d, g in cases:
        cin = 8
        taps = int(np.prod(k))
        v = LayerView("n", "Conv", "w", None, g, 4 * g, cin // g * taps, taps,
                      conv={"kernel": k, "pads": pads, "strides": s, "dilations": d})
        x = torch.randn(3, cin, *((9, 11) if len(k) == 2 else (13,)), generator=gen)
        assert torch.equal(v.patches(x), reference(v, x)), (k, pads, s, d, g)


def test_the_pipeline_asks_only_for_what_the_compensation_reads():
    """fisher/taylor + default OBS: input factors only (no S); kron-obs: S too; woodfisher/woodtaylor
    compensation: their own block inverses, no K-FAC factors."""
    from graphprune.criteria import make_criterion
    from graphprune.pipeline import PruneConfig
    from graphprune.stages.score import compensation_method as _compensation_method, needs_of as _needs

    cfg = PruneConfig()
    assert _needs(make_criterion("fisher"), _compensation_method(make_criterion("fisher"), cfg)) == {"fisher_diag", "kfac_a"}
    assert _needs(make_criterion("taylor"), "obs") == {"grads", "kfac_a"}
    assert "kfac" in _needs(make_criterion("taylor"), "kron-obs")
    for name in ("woodfisher", "woodtaylor"):
        crit = make_criterion(name)
        method = _compensation_method(crit, cfg)
        assert method == name and not _needs(crit, method) & {"kfac", "kfac_a"}
