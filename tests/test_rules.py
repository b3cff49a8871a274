"""Small-graph unit tests for every channel rule (graphprune/rules/*.py).

Each test builds a 2-6 node graph with a dynamic batch dim "N", traces it, checks which groups are
prunable/frozen (and why), prunes every prunable group at random (``prune_random`` asserts checker
validity, unchanged signature and parity with the masked original) and then checks the rewritten
structure: sliced initializers, rewritten attributes and shape constants.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.io import infer
from graphprune.planner import Budget, make_plan
from tests.helpers import const, ints, load_via_file, make_model, prune_random, trace_of

X = ("x", ["N", 3, 8, 8])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def node(op, ins, outs, **attrs):
    """A node named after its first output (so the pruned model can be searched by that name)."""
    return helper.make_node(op, ins, outs, name=outs[0], **attrs)


def fconst(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def stem(out="h", c=8, bias=True, src="x", c_in=3, k=3):
    """Conv src -> out with c output channels (pads keep the spatial size)."""
    ins = [src, f"{out}_w"] + ([f"{out}_b"] if bias else [])
    inits = [const(f"{out}_w", (c, c_in, k, k))] + ([const(f"{out}_b", (c,))] if bias else [])
    return [node("Conv", ins, [out], pads=[k // 2] * 4)], inits


def head(src, c_in, out="y", c_out=4, rank=4):
    """1x1 Conv src -> out (its output channels reach the graph output, so they are frozen)."""
    return [node("Conv", [src, f"{out}_w"], [out])], [const(f"{out}_w", (c_out, c_in) + (1,) * (rank - 2))]


def chain(*parts):
    nodes, inits = [], []
    for ns, its in parts:
        nodes += ns
        inits += its
    return nodes, inits


def prune(model, keep=0.5, seed=0, **kw):
    """prune_random plus the kept-mask function of the very plan it applied."""
    tr, pruned, _ = prune_random(model, keep=keep, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    scores = {g.id: rng.random(g.size) for g in tr.groups if g.prunable}
    plan = make_plan(tr, scores, Budget("channels", keep, cap=0.95))
    return tr, pruned, tr.kept_fn(tr.removed_roots(plan.removed))


def kept_of(tr, kept, tensor):
    return kept(tr.state.infos[tensor].ids)


def pnode(model, name):
    return next(n for n in model.graph.node if n.name == name)


def pattr(model, name, attr, default=None):
    for a in pnode(model, name).attribute:
        if a.name == attr:
            return helper.get_attribute_value(a)
    return default


def pinput(model, name, index):
    """The constant feeding input ``index`` of node ``name`` in a (pruned) model."""
    tname = pnode(model, name).input[index]
    for init in model.graph.initializer:
        if init.name == tname:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == tname:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(tname)


def pshape(model, tensor):
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        if vi.name == tensor:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
    raise KeyError(tensor)


def group_of(tr, tensor):
    """The one group holding the channels of ``tensor``."""
    gids = set(tr.locate(tr.state.infos[tensor].ids)[0].tolist())
    assert len(gids) == 1, gids
    return tr.groups[gids.pop()]


def source_group(tr, tensor):
    return next(g for g in tr.groups if any(s.tensor == tensor for s in g.sources))


def reasons(tr, tensor):
    ids = tr.state.infos[tensor].ids
    out = []
    for gid in set(tr.locate(ids)[0].tolist()):
        if gid >= 0:
            out += tr.groups[gid].frozen
    roots = set(tr.roots[ids].tolist())
    for fids, reason in tr.state.frozen:
        if roots & set(tr.roots[fids].tolist()):
            out.append(reason)
    return out


def traced(model):
    return trace_of(load_via_file(model))


def assert_prunable(tr, tensor, size=None):
    g = group_of(tr, tensor)
    assert g.prunable, g.frozen
    if size is not None:
        assert g.size == size


def assert_frozen(tr, tensor, *words):
    rs = reasons(tr, tensor)
    assert rs, f"{tensor} is not frozen"
    for w in words:
        assert any(w in r for r in rs), (w, rs)


def assert_output_frozen(tr, tensor="y"):
    assert_frozen(tr, tensor, "reaches graph output")


# --------------------------------------------------------------------------------------------
# Conv / ConvTranspose
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_conv(bias):
    nodes, inits = chain(stem(bias=bias), ([node("Relu", ["h"], ["r"])], []), head("r", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert_output_frozen(tr)
    assert not source_group(tr, "y").prunable
    assert pinput(pruned, "h", 1).shape == (4, 3, 3, 3)
    if bias:
        assert pinput(pruned, "h", 2).shape == (4,)
        np.testing.assert_array_equal(pinput(pruned, "h", 2),
                                      numpy_helper.to_array(inits[1])[kept_of(tr, kept, "h")])
    assert pinput(pruned, "y", 1).shape == (4, 4, 1, 1)
    np.testing.assert_array_equal(pinput(pruned, "y", 1),
                                  numpy_helper.to_array(inits[-1])[:, kept_of(tr, kept, "r")])
    assert pshape(pruned, "h") == ["N", 4, 8, 8]


def test_two_group_conv_prunes_in_tiles():
    g = 2
    nodes, inits = chain(stem(c=16),
                         ([node("Conv", ["h", "gw", "gb"], ["z"], group=g, pads=[1] * 4)],
                          [const("gw", (16, 16 // g, 3, 3)), const("gb", (16,))]),
                         head("z", 16))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr = traced(m)
    for t in ("h", "z"):
        gr = group_of(tr, t)
        assert gr.prunable and gr.size == 8 and gr.channels_per_unit == 2
    tr, pruned, kept = prune(m)
    assert pattr(pruned, "z", "group") == g
    kh, kz = kept_of(tr, kept, "h"), kept_of(tr, kept, "z")
    # the same position is kept in every tile
    assert (kh.reshape(g, 8) == kh.reshape(g, 8)[0]).all() and (kz.reshape(g, 8) == kz.reshape(g, 8)[0]).all()
    assert kh.sum() == 8 and kz.sum() == 8
    assert pinput(pruned, "z", 1).shape == (8, 4, 3, 3)
    assert pinput(pruned, "z", 2).shape == (8,)
    assert pinput(pruned, "y", 1).shape == (4, 8, 1, 1)


@pytest.mark.parametrize("g,out_per_group", [(4, 4), (4, 8), (8, 2)])
def test_grouped_conv_with_a_cardinality_prunes_whole_groups(g, out_per_group):
    """ResNeXt/RegNet: a unit is one conv group (its input and output channels); the kept groups
    are re-packed with ``group`` = their count and full per-group width (checked against the masked
    original by prune())."""
    cg = 16 // g
    m_out = g * out_per_group
    nodes, inits = chain(stem(c=16),
                         ([node("Conv", ["h", "gw", "gb"], ["z"], group=g, pads=[1] * 4)],
                          [const("gw", (m_out, cg, 3, 3)), const("gb", (m_out,))]),
                         ([node("Relu", ["z"], ["r"])], []), head("r", m_out))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr = traced(m)
    gr = group_of(tr, "h")
    assert gr is group_of(tr, "z") and gr.prunable and gr.size == g and gr.channels_per_unit == cg
    tr, pruned, kept = prune(m)
    kh, kz = kept_of(tr, kept, "h"), kept_of(tr, kept, "z")
    kept_groups = kh.reshape(g, cg)[:, 0]
    assert (kh.reshape(g, cg) == kept_groups[:, None]).all()  # whole input groups
    assert (kz.reshape(g, out_per_group) == kept_groups[:, None]).all()  # with their outputs
    kept_n = max(g // 2, 3)  # a conv of whole groups keeps at least 3 (it stays one when traced again)
    assert pattr(pruned, "z", "group") == kept_groups.sum() == kept_n
    assert pinput(pruned, "z", 1).shape == (kept_n * out_per_group, cg, 3, 3)  # per-group width kept
    np.testing.assert_array_equal(pinput(pruned, "z", 1), numpy_helper.to_array(inits[2])[kz])


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_rewrites_group(mult):
    nodes, inits = chain(stem(),
                         ([node("Conv", ["h", "dw", "db"], ["z"], group=8, pads=[1] * 4)],
                          [const("dw", (8 * mult, 1, 3, 3)), const("db", (8 * mult,))]),
                         ([node("Relu", ["z"], ["r"])], []),
                         head("r", 8 * mult))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    gr = group_of(tr, "z")
    assert gr is group_of(tr, "h") and gr.prunable and gr.size == 8
    assert pattr(pruned, "z", "group") == 4
    assert pinput(pruned, "z", 1).shape == (4 * mult, 1, 3, 3)
    np.testing.assert_array_equal(pinput(pruned, "z", 1),
                                  numpy_helper.to_array(inits[2])[np.repeat(kept_of(tr, kept, "h"), mult)])
    assert pinput(pruned, "z", 2).shape == (4 * mult,)
    assert pinput(pruned, "y", 1).shape == (4, 4 * mult, 1, 1)


def test_grouped_conv_on_graph_input_tiles_outputs():
    # grouped conv whose input is not traced: outputs still come in tiles of groups
    nodes, inits = chain(([node("Conv", ["x", "gw"], ["z"], group=3, pads=[1] * 4)], [const("gw", (12, 1, 3, 3))]),
                         head("z", 12))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert group_of(tr, "z").size == 4
    assert pattr(pruned, "z", "group") == 3
    assert pinput(pruned, "z", 1).shape == (6, 1, 3, 3)


def test_conv_transpose_plain():
    nodes, inits = chain(stem(),
                         ([node("ConvTranspose", ["h", "tw", "tb"], ["z"], strides=[2, 2])],
                          [const("tw", (8, 6, 2, 2)), const("tb", (6,))]),
                         head("z", 6))
    m = make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert_prunable(tr, "z", 6)
    assert pinput(pruned, "z", 1).shape == (4, 3, 2, 2)
    assert pinput(pruned, "z", 2).shape == (3,)
    assert pinput(pruned, "y", 1).shape == (4, 3, 1, 1)


def test_conv_transpose_depthwise():
    nodes, inits = chain(stem(),
                         ([node("ConvTranspose", ["h", "tw", "tb"], ["z"], group=8, strides=[2, 2])],
                          [const("tw", (8, 1, 2, 2)), const("tb", (8,))]),
                         head("z", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits)
    tr, pruned, kept = prune(m)
    assert group_of(tr, "z") is group_of(tr, "h")
    assert pattr(pruned, "z", "group") == 4
    assert pinput(pruned, "z", 1).shape == (4, 1, 2, 2)
    assert pinput(pruned, "z", 2).shape == (4,)


def test_conv_transpose_grouped_freezes():
    nodes, inits = chain(stem(),
                         ([node("ConvTranspose", ["h", "tw"], ["z"], group=2)], [const("tw", (8, 3, 1, 1))]),
                         head("z", 6))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "grouped ConvTranspose")


def test_conv1d():
    nodes = [node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1]), node("Relu", ["h"], ["r"]),
             node("Conv", ["r", "w2"], ["y"])]
    m = make_model(nodes, [("x", ["N", 3, 16])], [("y", ["N", 4, 16])],
                   [const("w1", (8, 3, 3)), const("b1", (8,)), const("w2", (4, 8, 1))])
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert pinput(pruned, "h", 1).shape == (4, 3, 3)
    assert pinput(pruned, "y", 1).shape == (4, 4, 1)


# --------------------------------------------------------------------------------------------
# Gemm / MatMul
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["vector", "row", "scalar", None])
def test_gemm(trans_b, bias):
    w1 = const("w1", (8, 16) if trans_b else (16, 8))
    w2 = const("w2", (4, 8) if trans_b else (8, 4))
    b_shape = {"vector": (8,), "row": (1, 8), "scalar": (), None: None}[bias]
    inits = [w1, w2] + ([const("b1", b_shape)] if b_shape is not None else [])
    nodes = [node("Gemm", ["x", "w1"] + (["b1"] if b_shape is not None else []), ["h"], transB=trans_b, beta=0.5),
             node("Relu", ["h"], ["r"]),
             node("Gemm", ["r", "w2"], ["y"], transB=trans_b)]
    m = make_model(nodes, [("x", ["N", 16])], [("y", ["N", 4])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    k = kept_of(tr, kept, "h")
    if trans_b:
        assert pinput(pruned, "h", 1).shape == (4, 16) and pinput(pruned, "y", 1).shape == (4, 4)
        np.testing.assert_array_equal(pinput(pruned, "y", 1), numpy_helper.to_array(w2)[:, k])
    else:
        assert pinput(pruned, "h", 1).shape == (16, 4) and pinput(pruned, "y", 1).shape == (4, 4)
        np.testing.assert_array_equal(pinput(pruned, "y", 1), numpy_helper.to_array(w2)[k])
    if bias in ("vector", "row"):
        assert pinput(pruned, "h", 2).shape == b_shape[:-1] + (4,)
    elif bias == "scalar":
        assert pinput(pruned, "h", 2).shape == ()


@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_then_bias_add(rank):
    lead = ["N"] + [5] * (rank - 2)
    nodes = [node("MatMul", ["x", "w1"], ["h"]), node("Add", ["h", "b1"], ["hb"]), node("Relu", ["hb"], ["r"]),
             node("MatMul", ["r", "w2"], ["y"])]
    m = make_model(nodes, [("x", lead + [16])], [("y", lead + [4])],
                   [const("w1", (16, 8)), const("b1", (8,)), const("w2", (8, 4))])
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert tr.state.infos["h"].axis == rank - 1
    assert pinput(pruned, "h", 1).shape == (16, 4)
    assert pinput(pruned, "hb", 1).shape == (4,)
    assert pinput(pruned, "y", 1).shape == (4, 4)


def test_matmul_weight_on_the_left_freezes():
    nodes = [node("MatMul", ["x", "w1"], ["h"]), node("MatMul", ["w2", "h"], ["y"])]
    tr = traced(make_model(nodes, [("x", [5, 16])], [("y", [3, 8])], [const("w1", (16, 8)), const("w2", (3, 5))]))
    assert_frozen(tr, "h", "MatMul")


# --------------------------------------------------------------------------------------------
# normalisations
# --------------------------------------------------------------------------------------------
def test_batchnorm():
    bn = [fconst("s", np.random.default_rng(1).uniform(0.5, 2, 8)), const("bb", (8,)), const("mu", (8,)),
          fconst("var", np.random.default_rng(2).uniform(0.5, 2, 8))]
    nodes, inits = chain(stem(), ([node("BatchNormalization", ["h", "s", "bb", "mu", "var"], ["n"]),
                                   node("Relu", ["n"], ["r"])], bn), head("r", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "n", 8)
    k = kept_of(tr, kept, "n")
    for i, t in enumerate(bn, start=1):
        np.testing.assert_array_equal(pinput(pruned, "n", i), numpy_helper.to_array(t)[k])


def test_instancenorm():
    nodes, inits = chain(stem(), ([node("InstanceNormalization", ["h", "s", "bb"], ["n"])],
                                  [const("s", (8,)), const("bb", (8,))]), head("n", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "n", 8)
    assert pinput(pruned, "n", 1).shape == (4,) and pinput(pruned, "n", 2).shape == (4,)


def test_layernorm_over_channels_freezes():
    nodes, inits = chain(stem(), ([node("LayerNormalization", ["h", "s", "bb"], ["n"], axis=1)],
                                  [const("s", (8, 8, 8)), const("bb", (8, 8, 8))]), head("n", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "LayerNormalization over the channels")
    assert not any(g.prunable for g in tr.groups)


def test_layernorm_channels_last_freezes():
    nodes = [node("MatMul", ["x", "w1"], ["h"]), node("LayerNormalization", ["h", "s"], ["n"], axis=-1),
             node("MatMul", ["n", "w2"], ["y"])]
    tr = traced(make_model(nodes, [("x", ["N", 5, 16])], [("y", ["N", 5, 4])],
                           [const("w1", (16, 8)), const("s", (8,)), const("w2", (8, 4))]))
    assert_frozen(tr, "h", "LayerNormalization over the channels")


def test_layernorm_over_last_spatial_axis_keeps_channels():
    nodes, inits = chain(stem(), ([node("LayerNormalization", ["h", "s", "bb"], ["n"], axis=-1)],
                                  [const("s", (8,)), const("bb", (8,))]), head("n", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert pinput(pruned, "n", 1).shape == (8,)  # spatial scale is not a channel member
    assert pshape(pruned, "n") == ["N", 4, 8, 8]


# --------------------------------------------------------------------------------------------
# unary ops
# --------------------------------------------------------------------------------------------
UNARY = [
    ("Relu", {}, 17), ("Sigmoid", {}, 17), ("Tanh", {}, 17), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17),
    ("HardSwish", {}, 17), ("LeakyRelu", {"alpha": 0.2}, 17), ("Identity", {}, 17), ("Dropout", {}, 17),
    ("Cast", {"to": TensorProto.FLOAT}, 17), ("Elu", {"alpha": 0.7}, 17), ("Celu", {"alpha": 1.5}, 17),
    ("Selu", {}, 17), ("Softplus", {}, 17), ("Softsign", {}, 17), ("Mish", {}, 18), ("Gelu", {}, 20),
    ("Erf", {}, 17), ("Neg", {}, 17), ("Abs", {}, 17), ("Exp", {}, 17), ("Sqrt", {}, 17),
    ("Reciprocal", {}, 17), ("Floor", {}, 17), ("Ceil", {}, 17), ("Round", {}, 17), ("Sign", {}, 17),
    ("ThresholdedRelu", {"alpha": 0.5}, 17),
]


def test_unary_table_is_covered():
    from graphprune.rules.elementwise import _UNARY

    assert {op for op, _, _ in UNARY} == set(_UNARY)


@pytest.mark.parametrize("op,attrs,opset", UNARY, ids=[u[0] for u in UNARY])
def test_unary(op, attrs, opset):
    if op == "Reciprocal":  # keep the domain away from 0: 1 + sigmoid (a sigmoid alone underflows to 0 -> inf)
        pre, pre_inits = [node("Sigmoid", ["h"], ["s"]), node("Add", ["s", "one"], ["p"])], [fconst("one", 1.0)]
    else:
        pre, pre_inits = [node("Sigmoid" if op == "Sqrt" else "Identity", ["h"], ["p"])], []  # Sqrt: domain >= 0
    nodes, inits = chain(stem(), (pre + [node(op, ["p"], ["u"], **attrs)], pre_inits), head("u", 8))
    if op == "Dropout":
        nodes[-2].output.append("mask")
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=opset)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "u", 8)
    assert group_of(tr, "u") is group_of(tr, "h")
    assert pshape(pruned, "u") == ["N", 4, 8, 8]
    assert pinput(pruned, "y", 1).shape == (4, 4, 1, 1)


@pytest.mark.parametrize("bounds", [("lo", "hi"), ("lo", ""), ("", "hi")])
def test_clip_with_bound_inputs(bounds):
    inits = [fconst("lo", -0.5), fconst("hi", 0.7)]
    nodes, inits = chain(stem(), ([node("Clip", ["h", *bounds], ["c"])], inits), head("c", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "c", 8)


def test_clip_with_dynamic_bound_freezes():
    nodes, inits = chain(stem(), ([node("Clip", ["h", "lo"], ["c"])], []), head("c", 8))
    m = make_model(nodes, [X, ("lo", [])], [("y", ["N", 4, 8, 8])], inits)
    assert_frozen(traced(m), "h", "Clip with non-constant bounds")


@pytest.mark.parametrize("slope_shape", [(8, 1, 1), (1,), ()])
def test_prelu(slope_shape):
    nodes, inits = chain(stem(), ([node("PRelu", ["h", "slope"], ["p"])], [const("slope", slope_shape)]),
                         head("p", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "p", 8)
    if slope_shape == (8, 1, 1):
        np.testing.assert_array_equal(pinput(pruned, "p", 1),
                                      numpy_helper.to_array(inits[2])[kept_of(tr, kept, "h")])
    else:
        assert pinput(pruned, "p", 1).shape == slope_shape


def test_silu_as_sigmoid_mul():
    nodes, inits = chain(stem(), ([node("Sigmoid", ["h"], ["s"]), node("Mul", ["h", "s"], ["m"])], []),
                         head("m", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "m", 8)
    assert len(group_of(tr, "m").sources) == 1


# --------------------------------------------------------------------------------------------
# binary / broadcasting ops
# --------------------------------------------------------------------------------------------
def test_residual_add_couples_two_convs():
    nodes, inits = chain(stem("a"), stem("b"), ([node("Add", ["a", "b"], ["s"])], []), head("s", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    g = group_of(tr, "s")
    assert g is group_of(tr, "a") is group_of(tr, "b")
    assert g.prunable and g.size == 8 and {s.tensor for s in g.sources} == {"a", "b"}
    np.testing.assert_array_equal(kept_of(tr, kept, "a"), kept_of(tr, kept, "b"))
    assert pinput(pruned, "a", 1).shape[0] == pinput(pruned, "b", 1).shape[0] == 4


def test_residual_add_across_a_conv():
    # s = a + Conv(Relu(a)): the inner conv is both consumer and producer of the group
    nodes, inits = chain(stem("a"), ([node("Relu", ["a"], ["r"])], []), stem("b", src="r", c_in=8),
                         ([node("Add", ["a", "b"], ["s"])], []), head("s", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert group_of(tr, "a") is group_of(tr, "b")
    assert pinput(pruned, "b", 1).shape == (4, 4, 3, 3)


@pytest.mark.parametrize("op", ["Sub", "Div", "Mul", "Add", "Max", "Min", "Pow"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1), (), (1,)])
def test_binary_with_constant(op, shape):
    c = fconst("c", np.random.default_rng(3).uniform(0.5, 1.5, shape))
    pre = [node("Sigmoid", ["h"], ["p"])] if op == "Pow" else [node("Identity", ["h"], ["p"])]
    nodes, inits = chain(stem(), (pre + [node(op, ["p", "c"], ["o"])], [c]), head("o", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "o", 8)
    if len(shape) >= 3 and shape[-3] == 8:
        np.testing.assert_array_equal(pinput(pruned, "o", 1),
                                      numpy_helper.to_array(c)[..., kept_of(tr, kept, "h"), :, :])
    else:
        assert pinput(pruned, "o", 1).shape == shape


def test_constant_on_the_left_of_sub():
    nodes, inits = chain(stem(), ([node("Sub", ["c", "h"], ["o"])], [const("c", (8, 1, 1))]), head("o", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert pinput(pruned, "o", 0).shape == (4, 1, 1)


def test_se_gate():
    nodes = [*stem()[0],
             node("GlobalAveragePool", ["h"], ["p"]),
             node("Conv", ["p", "wr", "br"], ["q"]), node("Relu", ["q"], ["qr"]),
             node("Conv", ["qr", "we", "be"], ["e"]), node("Sigmoid", ["e"], ["gate"]),
             node("Mul", ["h", "gate"], ["m"]), *head("m", 8)[0]]
    inits = [*stem()[1], const("wr", (2, 8, 1, 1)), const("br", (2,)), const("we", (8, 2, 1, 1)),
             const("be", (8,)), *head("m", 8)[1]]
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    g = group_of(tr, "m")
    assert g is group_of(tr, "h") is group_of(tr, "e")
    assert g.prunable and g.size == 8 and {s.tensor for s in g.sources} == {"h", "e"}
    assert_prunable(tr, "q", 2)
    assert pinput(pruned, "q", 1).shape == (1, 4, 1, 1)
    assert pinput(pruned, "e", 1).shape == (4, 1, 1, 1)
    assert pinput(pruned, "e", 2).shape == (4,)


def test_add_graph_input_freezes():
    nodes, inits = chain(stem(), ([node("Add", ["h", "x2"], ["s"])], []), head("s", 8))
    m = make_model(nodes, [X, ("x2", ["N", 8, 8, 8])], [("y", ["N", 4, 8, 8])], inits)
    tr = traced(m)
    assert_frozen(tr, "h", "Add")
    assert not any(g.prunable for g in tr.groups)


def test_single_channel_broadcast_gate():
    # spatial attention: x * sigmoid(conv(x) -> 1 channel); the 1-channel gate broadcasts over all channels
    nodes, inits = chain(stem(), stem("a", c=1, src="h", c_in=8),
                         ([node("Sigmoid", ["a"], ["s"]), node("Mul", ["h", "s"], ["m"])], []), head("m", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "m", 8)
    assert group_of(tr, "a").size == 1 and group_of(tr, "a") is not group_of(tr, "h")
    assert pinput(pruned, "a", 1).shape == (1, 4, 3, 3)


def test_sum_of_three_couples_all():
    nodes, inits = chain(stem("a"), stem("b"), stem("c", bias=False),
                         ([node("Sum", ["a", "b", "c"], ["s"]), node("Mean", ["s", "a"], ["mm"])], []), head("mm", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    g = group_of(tr, "mm")
    assert g.prunable and {s.tensor for s in g.sources} == {"a", "b", "c"}


def test_constant_shared_by_two_groups_is_copied():
    nodes, inits = chain(stem("a"), stem("b"),
                         ([node("Mul", ["a", "c"], ["ma"]), node("Mul", ["b", "c"], ["mb"]),
                           node("Concat", ["ma", "mb"], ["cat"], axis=1)], [const("c", (8, 1, 1))]), head("cat", 16))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    c = numpy_helper.to_array(inits[-2])
    np.testing.assert_array_equal(pinput(pruned, "ma", 1), c[kept_of(tr, kept, "a")])
    np.testing.assert_array_equal(pinput(pruned, "mb", 1), c[kept_of(tr, kept, "b")])


# --------------------------------------------------------------------------------------------
# Concat / Split / Slice
# --------------------------------------------------------------------------------------------
def test_concat_channels():
    nodes, inits = chain(stem("a"), stem("b", c=6), ([node("Concat", ["a", "b"], ["c"], axis=1)], []),
                         head("c", 14))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "a", 8)
    assert_prunable(tr, "b", 6)
    assert group_of(tr, "a") is not group_of(tr, "b")
    ka, kb = kept_of(tr, kept, "a"), kept_of(tr, kept, "b")
    assert pinput(pruned, "y", 1).shape == (4, ka.sum() + kb.sum(), 1, 1) == (4, 7, 1, 1)
    np.testing.assert_array_equal(pinput(pruned, "y", 1),
                                  numpy_helper.to_array(inits[-1])[:, np.concatenate([ka, kb])])


def test_concat_negative_axis():
    nodes, inits = chain(stem("a"), stem("b", c=6), ([node("Concat", ["a", "b"], ["c"], axis=-3)], []),
                         head("c", 14))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert pinput(pruned, "y", 1).shape == (4, 7, 1, 1)


def test_concat_with_graph_input():
    nodes, inits = chain(stem("a"), ([node("Concat", ["x2", "a"], ["c"], axis=1)], []), head("c", 12))
    m = make_model(nodes, [X, ("x2", ["N", 4, 8, 8])], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "a", 8)
    kc = kept_of(tr, kept, "c")
    assert kc[:4].all() and kc[4:].sum() == 4  # the graph input's channels are never removed
    assert any("non-traced" in r for _, r in tr.state.frozen)
    assert pinput(pruned, "y", 1).shape == (4, 8, 1, 1)


def test_concat_along_spatial_axis_couples():
    nodes, inits = chain(stem("a"), stem("b"), ([node("Concat", ["a", "b"], ["c"], axis=2)], []), head("c", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 16, 8])], inits)
    tr, pruned, kept = prune(m)
    assert group_of(tr, "a") is group_of(tr, "b")


def _split_model(opset, form):
    sizes = [3, 5] if form in ("attr", "input") else [4, 4]
    if form == "attr":
        sp = [node("Split", ["h"], ["s0", "s1"], axis=1, split=sizes)]
        extra = []
    elif form == "input":
        sp = [node("Split", ["h", "sizes"], ["s0", "s1"], axis=1)]
        extra = [ints("sizes", sizes)]
    elif form == "num_outputs":
        sp = [node("Split", ["h"], ["s0", "s1"], axis=1, num_outputs=2)]
        extra = []
    else:  # equal split without sizes
        sp = [node("Split", ["h"], ["s0", "s1"], axis=1)]
        extra = []
    nodes, inits = chain(stem(), (sp, extra), head("s0", sizes[0], "y0"), head("s1", sizes[1], "y1"))
    return make_model(nodes, [X], [("y0", ["N", 4, 8, 8]), ("y1", ["N", 4, 8, 8])], inits, opset=opset), sizes


@pytest.mark.parametrize("opset,form", [(13, "input"), (17, "input"), (11, "attr"), (11, "equal"),
                                        (13, "equal"), (18, "num_outputs")])
def test_split_channels(opset, form):
    m, sizes = _split_model(opset, form)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    k0, k1 = kept_of(tr, kept, "s0"), kept_of(tr, kept, "s1")
    new = [int(k0.sum()), int(k1.sum())]
    if opset < 13:
        assert pattr(pruned, "s0", "split") == new
    else:
        assert list(pinput(pruned, "s0", 1)) == new
        assert pattr(pruned, "s0", "num_outputs") is None
    assert pinput(pruned, "y0", 1).shape == (4, new[0], 1, 1)
    assert pinput(pruned, "y1", 1).shape == (4, new[1], 1, 1)


def test_split_on_spatial_axis():
    nodes, inits = chain(stem(), ([node("Split", ["h", "sizes"], ["s0", "s1"], axis=2)], [ints("sizes", [3, 5])]),
                         head("s0", 8, "y0"), head("s1", 8, "y1"))
    m = make_model(nodes, [X], [("y0", ["N", 4, 3, 8]), ("y1", ["N", 4, 5, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert list(pinput(pruned, "s0", 1)) == [3, 5]


@pytest.mark.parametrize("start,end", [(2, 7), (-6, 2 ** 62), (0, -1), (3, 100)])
def test_slice_channels(start, end):
    nodes, inits = chain(stem(), ([node("Slice", ["h", "st", "en", "ax"], ["s"])],
                                  [ints("st", [start]), ints("en", [end]), ints("ax", [1])]))
    a, b, _ = slice(start, end).indices(8)
    hn, hi = head("s", b - a)
    m = make_model(nodes + hn, [X], [("y", ["N", 4, 8, 8])], inits + hi)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    kh = kept_of(tr, kept, "h")
    new_a, new_b = int(kh[:a].sum()), int(kh[:b].sum())
    assert list(pinput(pruned, "s", 1)) == [new_a]
    assert list(pinput(pruned, "s", 2)) == [new_b]
    assert pinput(pruned, "y", 1).shape == (4, new_b - new_a, 1, 1)


def test_slice_channels_multi_axis():
    nodes, inits = chain(stem(), ([node("Slice", ["h", "st", "en", "ax", "sp"], ["s"])],
                                  [ints("st", [1, 2]), ints("en", [7, 6]), ints("ax", [2, 1]), ints("sp", [2, 1])]),
                         head("s", 4))
    m = make_model(nodes, [X], [("y", ["N", 4, 3, 8])], inits)
    tr, pruned, kept = prune(m)
    kh = kept_of(tr, kept, "h")
    assert list(pinput(pruned, "s", 1)) == [1, int(kh[:2].sum())]
    assert list(pinput(pruned, "s", 2)) == [7, int(kh[:6].sum())]


def test_slice_channels_negative_axis_int32():
    nodes, inits = chain(stem(), ([node("Slice", ["h", "st", "en", "ax"], ["s"])],
                                  [numpy_helper.from_array(np.array([1], np.int32), "st"),
                                   numpy_helper.from_array(np.array([-1], np.int32), "en"),
                                   numpy_helper.from_array(np.array([-3], np.int32), "ax")]), head("s", 6))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    kh = kept_of(tr, kept, "h")
    st, en = pinput(pruned, "s", 1), pinput(pruned, "s", 2)
    assert st.dtype == np.int32 and list(st) == [int(kh[:1].sum())] and list(en) == [int(kh[:7].sum())]


def test_slice_spatial_axis():
    nodes, inits = chain(stem(), ([node("Slice", ["h", "st", "en", "ax"], ["s"])],
                                  [ints("st", [1]), ints("en", [7]), ints("ax", [3])]), head("s", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 6])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert list(pinput(pruned, "s", 1)) == [1] and list(pinput(pruned, "s", 2)) == [7]
    assert pshape(pruned, "s") == ["N", 4, 8, 6]


def test_strided_slice_on_channels_freezes():
    nodes, inits = chain(stem(), ([node("Slice", ["h", "st", "en", "ax", "sp"], ["s"])],
                                  [ints("st", [0]), ints("en", [8]), ints("ax", [1]), ints("sp", [2])]),
                         head("s", 4))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "strided Slice")


# --------------------------------------------------------------------------------------------
# pooling / reductions / softmax
# --------------------------------------------------------------------------------------------
POOLS = [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [4, 4]),
         ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, [8, 8]),
         ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, [8, 8]),
         ("GlobalAveragePool", {}, [1, 1]), ("GlobalMaxPool", {}, [1, 1]),
         ("LpPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [4, 4]), ("GlobalLpPool", {}, [1, 1])]


@pytest.mark.parametrize("op,attrs,spatial", POOLS, ids=[f"{p[0]}{i}" for i, p in enumerate(POOLS)])
def test_pool(op, attrs, spatial):
    nodes, inits = chain(stem(), ([node(op, ["h"], ["p"], **attrs)], []), head("p", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, *spatial])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "p", 8)
    assert pshape(pruned, "p") == ["N", 4, *spatial]


def test_maxpool_indices_used_freezes():
    nodes, inits = chain(stem(), ([node("MaxPool", ["h"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
                                   node("Cast", ["idx"], ["idxf"], to=TensorProto.FLOAT)], []), head("p", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 4, 4]), ("idxf", ["N", 8, 4, 4])], inits))
    assert_frozen(tr, "h", "indices")


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_spatial_then_gemm(opset):
    red = (node("ReduceMean", ["h", "axes"], ["r"], keepdims=0) if opset >= 18
           else node("ReduceMean", ["h"], ["r"], axes=[2, 3], keepdims=0))
    nodes, inits = chain(stem(), ([red, node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
                                  [const("w2", (4, 8)), const("b2", (4,))] + ([ints("axes", [2, 3])] if opset >= 18 else [])))
    m = make_model(nodes, [X], [("y", ["N", 4])], inits, opset=opset)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert tr.state.infos["r"].axis == 1
    assert pinput(pruned, "y", 1).shape == (4, 4)
    assert pshape(pruned, "r") == ["N", 4]


def test_reduce_keepdims_leading_axis_shifts_channel_axis():
    # ReduceSum over [2] with keepdims=0 on NCHW keeps the channel axis; over [-1] of an NHWC tensor too
    nodes, inits = chain(stem(), ([node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
                                   node("ReduceSum", ["t", "axes"], ["r"], keepdims=0),
                                   node("MatMul", ["r", "w2"], ["y"])], [ints("axes", [1]), const("w2", (8, 4))]))
    m = make_model(nodes, [X], [("y", ["N", 8, 4])], inits)
    tr, pruned, kept = prune(m)
    assert tr.state.infos["r"].axis == 2
    assert pinput(pruned, "y", 1).shape == (4, 4)


def test_reduce_over_channels_freezes():
    nodes, inits = chain(stem(), ([node("ReduceMean", ["h"], ["r"], axes=[1], keepdims=1)], []), head("r", 1))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=13))
    assert_frozen(tr, "h", "ReduceMean over the channels")
    assert not any(g.prunable for g in tr.groups)


def test_softmax_over_channels_freezes():
    nodes, inits = chain(stem(), ([node("Softmax", ["h"], ["s"], axis=1)], []), head("s", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "Softmax across the channel axis")


def test_softmax_opset11_default_axis_reaches_channels():
    nodes, inits = chain(stem(), ([node("Softmax", ["h"], ["s"], axis=2)], []), head("s", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=11))
    assert group_of(tr, "h").prunable  # opset < 13: coerced to 2-D from `axis` on (here H, W)
    nodes, inits = chain(stem(), ([node("Softmax", ["h"], ["s"])], []), head("s", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=11))
    assert_frozen(tr, "h", "Softmax across the channel axis")


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "LpNormalization"])
def test_softmax_over_last_axis(op):
    nodes, inits = chain(stem(), ([node(op, ["h"], ["s"], axis=-1)], []), head("s", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)


# --------------------------------------------------------------------------------------------
# Pad / Resize / Upsample
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_spatial(mode):
    nodes, inits = chain(stem(), ([node("Pad", ["h", "pads"], ["p"], mode=mode)],
                                  [ints("pads", [0, 0, 1, 2, 0, 0, 2, 1])]), head("p", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 11, 11])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "p", 8)
    assert list(pinput(pruned, "p", 1)) == [0, 0, 1, 2, 0, 0, 2, 1]


def test_pad_with_axes_input():
    nodes, inits = chain(stem(), ([node("Pad", ["h", "pads", "", "axes"], ["p"])],
                                  [ints("pads", [1, 2, 2, 1]), ints("axes", [2, 3])]), head("p", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 11, 11])], inits, opset=18)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "p", 8)


def test_pad_channels_freezes():
    nodes, inits = chain(stem(), ([node("Pad", ["h", "pads"], ["p"])], [ints("pads", [0, 1, 0, 0, 0, 1, 0, 0])]),
                         head("p", 10))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "Pad along the channel axis")


def test_resize_scales():
    nodes, inits = chain(stem(), ([node("Resize", ["h", "", "scales"], ["r"], mode="nearest")],
                                  [fconst("scales", [1, 1, 2, 2])]), head("r", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert list(pinput(pruned, "r", 2)) == [1, 1, 2, 2]


def test_resize_opset11_roi_and_scales():
    nodes, inits = chain(stem(), ([node("Resize", ["h", "roi", "scales"], ["r"], mode="linear")],
                                  [fconst("roi", []), fconst("scales", [1, 1, 2, 2])]), head("r", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits, opset=11)
    prune(m)


def test_resize_sizes_rewritten():
    # sizes must name the batch too, so this model has a static batch
    xs = ("x", [2, 3, 8, 8])
    nodes, inits = chain(stem(), ([node("Resize", ["h", "", "", "sizes"], ["r"], mode="nearest")],
                                  [ints("sizes", [2, 8, 12, 12])]), head("r", 8))
    m = make_model(nodes, [xs], [("y", [2, 4, 12, 12])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert list(pinput(pruned, "r", 3)) == [2, 4, 12, 12]


def test_resize_scaling_channels_freezes():
    nodes, inits = chain(stem(), ([node("Resize", ["h", "", "scales"], ["r"], mode="nearest")],
                                  [fconst("scales", [1, 2, 2, 2])]), head("r", 16))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits))
    assert_frozen(tr, "h", "Resize")


def test_upsample_opset9_rule_only():
    # graphprune refuses opset < 11 at load time (Upsample is deprecated from opset 10 on); check the rule alone
    for scales, frozen in (([1, 1, 2, 2], False), ([1, 2, 2, 2], True)):
        nodes, inits = chain(stem(), ([node("Upsample", ["h", "scales"], ["u"])], [fconst("scales", scales)]),
                             head("u", 8 * scales[1]))
        m = infer(make_model(nodes, [X], [("y", ["N", 4, 16, 16])], inits, opset=9))
        tr = trace_of(m)
        assert bool(group_of(tr, "h").frozen) == frozen


# --------------------------------------------------------------------------------------------
# Flatten / Reshape / Transpose / Squeeze
# --------------------------------------------------------------------------------------------
def _pooled_stem():
    return chain(stem(), ([node("MaxPool", ["h"], ["p"], kernel_shape=[2, 2], strides=[2, 2])], []))  # [N,8,4,4]


def test_flatten_then_gemm():
    nodes, inits = chain(_pooled_stem(), ([node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "w2"], ["y"])],
                                          [const("w2", (128, 10))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert len(tr.state.infos["f"]) == 128
    kh = kept_of(tr, kept, "h")
    assert pinput(pruned, "y", 1).shape == (4 * 16, 10)
    np.testing.assert_array_equal(pinput(pruned, "y", 1), numpy_helper.to_array(inits[-1])[np.repeat(kh, 16)])


@pytest.mark.parametrize("shape", [[-1, 128], [0, -1], [0, 128]])
def test_reshape_then_gemm(shape):
    nodes, inits = chain(_pooled_stem(), ([node("Reshape", ["p", "shape"], ["f"]),
                                           node("Gemm", ["f", "w2"], ["y"], transB=1)],
                                          [ints("shape", shape), const("w2", (10, 128))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    new = list(pinput(pruned, "f", 1))
    assert new[1] == 64 and new[0] in (-1, 0)
    assert pinput(pruned, "y", 1).shape == (10, 64)


@pytest.mark.parametrize("shape", [[-1, 8], [0, 8], [0, -1]])
def test_reshape_nc11_to_nc(shape):
    nodes, inits = chain(stem(), ([node("GlobalAveragePool", ["h"], ["g"]), node("Reshape", ["g", "shape"], ["f"]),
                                   node("Gemm", ["f", "w2"], ["y"], transB=1)],
                                  [ints("shape", shape), const("w2", (10, 8))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    new = list(pinput(pruned, "f", 1))
    assert new[1] == 4 and new[0] in (-1, 0)


def test_reshape_nc_to_nc11():
    nodes, inits = chain(([node("Gemm", ["x", "w1"], ["h"], transB=1), node("Reshape", ["h", "shape"], ["f"])],
                          [const("w1", (8, 16)), ints("shape", [-1, 8, 1, 1])]), head("f", 8))
    m = make_model(nodes, [("x", ["N", 16])], [("y", ["N", 4, 1, 1])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert list(pinput(pruned, "f", 1)) == [-1, 4, 1, 1]


def test_transpose_nhwc_then_matmul():
    nodes, inits = chain(stem(), ([node("Transpose", ["h"], ["t"], perm=[0, 2, 3, 1]),
                                   node("MatMul", ["t", "w2"], ["y"])], [const("w2", (8, 6))]))
    m = make_model(nodes, [X], [("y", ["N", 8, 8, 6])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert tr.state.infos["t"].axis == 3
    assert pinput(pruned, "y", 1).shape == (4, 6)
    assert_output_frozen(tr)


def test_transpose_default_perm():
    nodes, inits = chain(stem(), ([node("Transpose", ["h"], ["t"]), node("Transpose", ["t"], ["t2"])], []),
                         head("t2", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert tr.state.infos["t"].axis == 2 and tr.state.infos["t2"].axis == 1
    assert pshape(pruned, "t") == [8, 8, 4, "N"]


def test_transpose_then_matmul_over_non_channel_axis_freezes():
    nodes, inits = chain(stem(), ([node("MatMul", ["h", "w2"], ["y"])], [const("w2", (8, 6))]))
    tr = traced(make_model(nodes, [X], [("y", ["N", 8, 8, 6])], inits))
    assert_frozen(tr, "h", "MatMul reads channels on a non-contracted axis")


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze(opset):
    if opset >= 13:
        sq = [node("Squeeze", ["g", "axes"], ["s"]), node("Unsqueeze", ["s", "axes"], ["u"])]
        extra = [ints("axes", [2, 3])]
    else:
        sq = [node("Squeeze", ["g"], ["s"], axes=[2, 3]), node("Unsqueeze", ["s"], ["u"], axes=[-1, -2])]
        extra = []
    nodes, inits = chain(stem(), ([node("GlobalAveragePool", ["h"], ["g"]), *sq], extra), head("u", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 1, 1])], inits, opset=opset)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert tr.state.infos["s"].axis == 1 and tr.state.infos["u"].axis == 1
    assert pshape(pruned, "s") == ["N", 4]


def test_unsqueeze_before_channel_axis():
    nodes, inits = chain(stem(), ([node("Unsqueeze", ["h", "axes"], ["u"]), node("Squeeze", ["u", "axes"], ["s"])],
                                  [ints("axes", [0])]), head("s", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert tr.state.infos["u"].axis == 2 and tr.state.infos["s"].axis == 1


def _two_branches(c=4):
    """Two convs of c channels each, concatenated: ShuffleNetV2's unit output before its shuffle."""
    a, ia = stem("a", c)
    b, ib = stem("b", c)
    return a + b + [node("Concat", ["a", "b"], ["cat"], axis=1)], ia + ib


def _shuffle_masks(tr, kept, c=4):
    """Position q of both branches goes together (the shuffle stays a shuffle)."""
    ka, kb = kept_of(tr, kept, "a"), kept_of(tr, kept, "b")
    assert np.array_equal(ka, kb), (ka, kb)
    return int(ka.sum())


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_channel_shuffle_with_constant_shapes(keep):
    """x.view(N, 2, C/2, H, W).transpose(1, 2).reshape(N, C, H, W) with constant shapes (the dynamo
    exporter, tf2onnx): prunable; channel q of both concatenated branches goes together; the split's
    C/2 and the merge's C are rewritten."""
    nodes, inits = chain(_two_branches(), ([node("Reshape", ["cat", "s1"], ["r1"]),
                                            node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
                                            node("Reshape", ["t", "s2"], ["r2"])],
                                           [ints("s1", [-1, 2, 4, 8, 8]), ints("s2", [-1, 8, 8, 8])]), head("r2", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m, keep=keep)
    assert_prunable(tr, "a", 4)
    q = _shuffle_masks(tr, kept)
    assert 0 < q < 4
    shapes = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer}
    assert shapes[pnode(pruned, "r1").input[1]] == [-1, 2, q, 8, 8]
    assert shapes[pnode(pruned, "r2").input[1]][1] == 2 * q


def test_channel_shuffle_with_shapes_computed_at_run_time():
    """The TorchScript exporter with a dynamic batch: the split's C/2 is Div(Shape(x)[1], 2), the
    merge's C is Shape(x)[1], and torch.chunk's Slice bounds after it are ((C + 1) / 2) * k. All
    follow the pruned width at run time or become constants; parity at every batch size."""
    def dim(t, k, out):
        return [node("Shape", [t], [out + "_s"]), node("Gather", [out + "_s", out + "_i"], [out + "_g"], axis=0),
                node("Unsqueeze", [out + "_g", "ax0"], [out])], [ints(out + "_i", k)]

    parts = [_two_branches(), dim("cat", 0, "d0"), dim("cat", 2, "d2"), dim("cat", 3, "d3"), dim("cat", 1, "d1"),
             ([node("Shape", ["cat"], ["cs"]), node("Gather", ["cs", "one"], ["cg"], axis=0),
               node("Div", ["cg", "two"], ["half"]), node("Cast", ["half"], ["half_c"], to=7),
               node("Unsqueeze", ["half_c", "ax0"], ["q"]),
               node("Concat", ["d0", "two1", "q", "d2", "d3"], ["s1"], axis=0),
               node("Concat", ["d0", "d1", "d2", "d3"], ["s2"], axis=0),
               node("Reshape", ["cat", "s1"], ["r1"]), node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
               node("Reshape", ["t", "s2"], ["r2"]),
               # torch.chunk(r2, 2, dim=1): Slice bounds ((C + 1) / 2) * k read off r2's shape
               node("Shape", ["r2"], ["rs"]), node("Gather", ["rs", "one1"], ["rc"], axis=0),
               node("Add", ["rc", "one1"], ["rc1"]), node("Div", ["rc1", "two1"], ["rh"]),
               node("Mul", ["rh", "one1"], ["e0"]), node("Mul", ["rh", "two1"], ["e1"]),
               node("Slice", ["r2", "zero1", "e0", "one1"], ["x1"]), node("Slice", ["r2", "e0", "e1", "one1"], ["x2"]),
               node("Add", ["x1", "x2"], ["sum"])],
              [ints("ax0", [0]), ints("one", 1), ints("two", 2), ints("one1", [1]), ints("two1", [2]),
               ints("zero1", [0])]),
             head("sum", 4)]
    nodes, inits = chain(*parts)
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m, keep=0.5)
    assert_prunable(tr, "a")
    _shuffle_masks(tr, kept)


def test_channel_shuffle_paddle_style_computed_shapes():
    """paddle2onnx: the batch read through Shape -> Slice, the other entries constants written into
    the shape Concat (the split's C/2 and the merge's C are rewritten in place)."""
    nodes, inits = chain(_two_branches(), (
        [node("Shape", ["cat"], ["sh"]), node("Slice", ["sh", "z", "o"], ["bs"]),
         node("Concat", ["bs", "split_rest"], ["s1"], axis=0), node("Concat", ["bs", "merge_rest"], ["s2"], axis=0),
         node("Reshape", ["cat", "s1"], ["r1"]), node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
         node("Reshape", ["t", "s2"], ["r2"])],
        [ints("z", [0]), ints("o", [1]), ints("split_rest", [2, 4, 8, 8]), ints("merge_rest", [8, 8, 8])]),
        head("r2", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=11)
    tr, pruned, kept = prune(m, keep=0.5)
    q = _shuffle_masks(tr, kept)
    shapes = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t).tolist() for n in pruned.graph.node
              if n.op_type == "Constant"}
    values = [v for v in list(shapes.values()) + list(consts.values()) if isinstance(v, list)]
    assert [2, q, 8, 8] in values and [2 * q, 8, 8] in values, values


def test_channel_shuffle_tf2onnx_nhwc():
    """tf2onnx: channels last between Transposes; the shuffle splits the last axis into (2, C/2)."""
    nodes, inits = chain(_two_branches(), (
        [node("Transpose", ["cat"], ["nhwc"], perm=[0, 2, 3, 1]), node("Reshape", ["nhwc", "s1"], ["r1"]),
         node("Transpose", ["r1"], ["t"], perm=[0, 1, 2, 4, 3]), node("Reshape", ["t", "s2"], ["r2"]),
         node("Transpose", ["r2"], ["nchw"], perm=[0, 3, 1, 2])],
        [ints("s1", [-1, 8, 8, 2, 4]), ints("s2", [-1, 8, 8, 8])]), head("nchw", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=13)
    tr, pruned, kept = prune(m, keep=0.5)
    q = _shuffle_masks(tr, kept)
    shapes = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer}
    assert shapes[pnode(pruned, "r1").input[1]] == [-1, 8, 8, 2, q]
    assert shapes[pnode(pruned, "r2").input[1]] == [-1, 8, 8, 2 * q]


def test_channel_split_that_is_not_a_shuffle():
    """A split of the channel axis into (2, 4) that is not a shuffle: with H and W swapped in between,
    each half stays whole (pruned in halves, as attention heads); merged back into another shape,
    frozen."""
    def model(perm, merge):
        nodes, inits = chain(stem(), ([node("Reshape", ["h", "s1"], ["r1"]), node("Transpose", ["r1"], ["t"], perm=perm),
                                       node("Reshape", ["t", "s2"], ["r2"])],
                                      [ints("s1", [-1, 2, 4, 8, 8]), ints("s2", merge)]),
                             head("r2", merge[1]))
        return make_model(nodes, [X], [("y", ["N", 4, merge[2], 8])], inits)

    tr, pruned, kept = prune(model([0, 1, 2, 4, 3], [-1, 8, 8, 8]))
    assert group_of(tr, "h").channels_per_unit == 4
    assert kept_of(tr, kept, "h").sum() == 4
    tr = traced(model([0, 2, 1, 3, 4], [-1, 4, 16, 8]))
    assert_frozen(tr, "h")
    assert not any(g.prunable for g in tr.groups)


# --------------------------------------------------------------------------------------------
# freezing: unknown ops, graph outputs, control flow
# --------------------------------------------------------------------------------------------
def test_lrn_freezes():
    nodes, inits = chain(stem(), ([node("LRN", ["h"], ["l"], size=3)], []), head("l", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    assert_frozen(tr, "h", "no channel rule for LRN")
    assert not any(g.prunable for g in tr.groups)


def test_custom_domain_op_freezes():
    nodes, inits = chain(stem(), ([helper.make_node("Foo", ["h"], ["f"], name="f", domain="com.example")], []),
                         head("f", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    tr = trace_of(infer(m))
    assert_frozen(tr, "h", "no channel rule for com.example::Foo")


def test_tensor_reaching_graph_output_freezes():
    nodes, inits = chain(stem(), ([node("Relu", ["h"], ["r"])], []), head("r", 8))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8]), ("r", ["N", 8, 8, 8])], inits))
    assert_frozen(tr, "h", "reaches graph output 'r'")
    assert not any(g.prunable for g in tr.groups)


def test_if_consuming_channels_freezes():
    then_g = helper.make_graph([helper.make_node("Identity", ["h"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["o2"])], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    nodes, inits = chain(stem(), ([node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)], []),
                         head("z", 8))
    m = make_model(nodes, [X, ("cond", [])], [("y", ["N", 4, 8, 8])], inits)
    m.graph.input[1].type.tensor_type.elem_type = TensorProto.BOOL
    tr = traced(m)
    assert_frozen(tr, "h", "control flow (If)")
    assert not any(g.prunable for g in tr.groups)


# --------------------------------------------------------------------------------------------
# per-channel constant values (what --lossless proves with)
# --------------------------------------------------------------------------------------------
def test_conv_values_of_zero_weight_channels():
    w = np.random.default_rng(4).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[:2] = 0
    b = np.array([-1.0, 2.0, 0.5, 0.5], np.float32)
    nodes, inits = chain(([node("Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 4), node("Relu", ["h"], ["r"])],
                          [fconst("w1", w), fconst("b1", b)]), head("r", 4))
    tr = traced(make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits))
    np.testing.assert_array_equal(tr.state.infos["h"].vals[:2], [-1.0, 2.0])
    assert np.isnan(tr.state.infos["h"].vals[2:]).all()
    np.testing.assert_array_equal(tr.state.infos["r"].vals[:2], [0.0, 2.0])


@pytest.mark.parametrize("c_shape", [(8,), (1, 8), (2, 8), (2, 1), ()])
def test_gemm_values_use_beta_and_any_bias_layout(c_shape):
    # static batch 2 so that C may have a row dimension
    w = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    w[:, 0] = 0
    c = np.random.default_rng(6).uniform(1, 2, c_shape).astype(np.float32)
    nodes = [node("Gemm", ["x", "w1", "b1"], ["h"], beta=0.5), node("Gemm", ["h", "w2"], ["y"])]
    m = make_model(nodes, [("x", [2, 16])], [("y", [2, 4])], [fconst("w1", w), fconst("b1", c), const("w2", (8, 4))])
    tr, pruned, kept = prune(m)
    v0 = tr.state.infos["h"].vals[0]
    cc = np.broadcast_to(c.reshape((1,) * (2 - c.ndim) + c.shape), (2, 8))[:, 0]
    if (cc == cc[0]).all():
        assert v0 == pytest.approx(0.5 * cc[0])
    else:
        assert np.isnan(v0)
    assert np.isnan(tr.state.infos["h"].vals[1:]).all()
    if c_shape in ((8,), (1, 8), (2, 8)):
        assert pinput(pruned, "h", 2).shape == c_shape[:-1] + (4,)
    else:
        assert pinput(pruned, "h", 2).shape == c_shape


# --------------------------------------------------------------------------------------------
# common exporter patterns built from the rules above
# --------------------------------------------------------------------------------------------
def test_view_batch_minus_one_with_computed_shape():
    # torch x.view(x.size(0), -1): the shape comes from Shape -> Gather -> Unsqueeze -> Concat
    nodes, inits = chain(_pooled_stem(), ([node("Shape", ["p"], ["shp"]), node("Gather", ["shp", "zero"], ["n0"], axis=0),
                                           node("Unsqueeze", ["n0", "ax0"], ["n1"]),
                                           node("Concat", ["n1", "m1"], ["tgt"], axis=0),
                                           node("Reshape", ["p", "tgt"], ["f"]), node("Gemm", ["f", "w2"], ["y"])],
                                          [ints("zero", 0), ints("ax0", [0]), ints("m1", [-1]), const("w2", (128, 10))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert pinput(pruned, "y", 1).shape == (64, 10)


def test_tokens_reshape_transpose_matmul():
    # [N,C,H,W] -> [N,C,H*W] -> [N,H*W,C] -> MatMul: channels end on the last axis
    nodes, inits = chain(_pooled_stem(), ([node("Reshape", ["p", "shape"], ["r"]),
                                           node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
                                           node("MatMul", ["t", "w2"], ["y"])], [ints("shape", [0, 0, -1]), const("w2", (8, 6))]))
    m = make_model(nodes, [X], [("y", ["N", 16, 6])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h", 8)
    assert tr.state.infos["r"].axis == 1 and tr.state.infos["t"].axis == 2
    assert list(pinput(pruned, "r", 1)) == [0, 4, 16]
    assert pinput(pruned, "y", 1).shape == (4, 6)


def test_flatten_then_matmul():
    nodes, inits = chain(stem(), ([node("GlobalAveragePool", ["h"], ["g"]), node("Flatten", ["g"], ["f"]),
                                   node("MatMul", ["f", "w2"], ["y"])], [const("w2", (8, 10))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits)
    tr, pruned, kept = prune(m)
    assert pinput(pruned, "y", 1).shape == (4, 10)


def test_concat_same_tensor_twice():
    nodes, inits = chain(stem(), ([node("Concat", ["h", "h"], ["c"], axis=1)], []), head("c", 16))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    kh = kept_of(tr, kept, "h")
    np.testing.assert_array_equal(pinput(pruned, "y", 1), numpy_helper.to_array(inits[-1])[:, np.tile(kh, 2)])


def test_squeeze_without_axes_opset11():
    nodes, inits = chain(stem(), ([node("GlobalAveragePool", ["h"], ["g"]), node("Squeeze", ["g"], ["s"]),
                                   node("Gemm", ["s", "w2"], ["y"])], [const("w2", (8, 10))]))
    m = make_model(nodes, [X], [("y", ["N", 10])], inits, opset=11)
    tr, pruned, kept = prune(m)
    assert tr.state.infos["s"].axis == 1


def test_grouped_conv_couples_concatenated_branches():
    # groups=2 over concat(a, b): channel j of a goes with channel j of b
    nodes, inits = chain(stem("a", c=4), stem("b", c=4), ([node("Concat", ["a", "b"], ["c"], axis=1),
                                                          node("Conv", ["c", "gw"], ["z"], group=2)],
                                                         [const("gw", (8, 4, 1, 1))]), head("z", 8))
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m)
    assert group_of(tr, "a") is group_of(tr, "b")
    np.testing.assert_array_equal(kept_of(tr, kept, "a"), kept_of(tr, kept, "b"))
    assert pattr(pruned, "z", "group") == 2
    assert pinput(pruned, "z", 1).shape == (4, 2, 1, 1)


def test_slice_of_another_axis_bounded_by_the_channel_count():
    """x[:, :, :C] with C read at run time off a tensor whose channel count shape inference cannot
    see (behind a Reshape to a computed shape): the bound becomes the original constant, so the
    spatial slice does not shrink with the channels."""
    nodes, inits = chain(stem(c=6), ([node("Shape", ["h"], ["hs"]), node("Slice", ["hs", "zero", "one"], ["b"]),
                                      node("Slice", ["hs", "two", "four"], ["hw"]),
                                      node("Concat", ["b", "minus1", "hw"], ["tgt"], axis=0),
                                      node("Reshape", ["h", "tgt"], ["h2"]),
                                      node("Shape", ["h2"], ["sh"]), node("Gather", ["sh", "i1"], ["c"], axis=0),
                                      node("Unsqueeze", ["c", "ax0"], ["end"]),
                                      node("Slice", ["h2", "zero", "end", "two"], ["s"])],
                                     [ints("i1", 1), ints("ax0", [0]), ints("zero", [0]), ints("one", [1]),
                                      ints("two", [2]), ints("four", [4]), ints("minus1", [-1])]),
                         head("s", 6))
    m = make_model(nodes, [X], [("y", ["N", 4, 6, 8])], inits)
    tr, pruned, kept = prune(m)
    assert_prunable(tr, "h")
    assert any(n.op_type == "Slice" for n in pruned.graph.node)


def test_reshape_entry_that_multiplies_a_channel_count():
    """A computed Reshape target whose other entry is the pruned channel count times a constant
    (Shape(h)[1:2] * 8, H*W here): left computed, that entry would shrink with the pruned width and
    the -1 on the channel axis would absorb it ((N, 8, 32) for (N, 4, 64)), and the Softmax over
    the last axis would mix the wrong values. The shape is rewritten as a template instead (the
    masked original's 64 kept); parity at two batch sizes."""
    def dim(t, k, out):
        return [node("Shape", [t], [out + "_s"]), node("Gather", [out + "_s", out + "_i"], [out + "_g"], axis=0),
                node("Unsqueeze", [out + "_g", "ax0"], [out])], [ints(out + "_i", k)]

    parts = [stem(), dim("h", 0, "d0"),
             ([node("Shape", ["h"], ["d1"], start=1, end=2), node("Mul", ["d1", "eight"], ["c8"]),
               node("Concat", ["d0", "m1", "c8"], ["s1"], axis=0), node("Reshape", ["h", "s1"], ["r1"]),
               node("Softmax", ["r1"], ["sm"], axis=2),
               node("Concat", ["d0", "m1", "eight", "eight"], ["s2"], axis=0), node("Reshape", ["sm", "s2"], ["r2"])],
              [ints("ax0", [0]), ints("eight", [8]), ints("m1", [-1])]),
             head("r2", 8)]
    nodes, inits = chain(*parts)
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m, keep=0.5)
    assert_prunable(tr, "h", 8)
    assert pshape(pruned, "r1")[1:] == [4, 64]


def test_expand_broadcasts_other_axes_and_rewrites_the_channel_count():
    """Expand keeps the channel axis and broadcasts a size-1 axis after it (the repeat of grouped
    k/v heads): h (N, 8, 8, 8) -> Unsqueeze (N, 8, 1, 8, 8) -> Expand to (N, 8, 2, 8, 8) with the
    channel count 8 written in the shape (rewritten to the kept count) -> Reshape (N, 16, 8, 8),
    each channel twice (merged by _flatten_map). Parity at two batch sizes."""
    parts = [stem(),
             ([node("Unsqueeze", ["h", "ax2"], ["u"]),
               node("Shape", ["h"], ["hs"]), node("Slice", ["hs", "zero1", "one1"], ["n"]),
               node("Concat", ["n", "eight", "two", "eight", "eight"], ["es"], axis=0),
               node("Expand", ["u", "es"], ["e"]),
               node("Concat", ["n", "sixteen", "eight", "eight"], ["rs"], axis=0),
               node("Reshape", ["e", "rs"], ["r"])],
              [ints("ax2", [2]), ints("zero1", [0]), ints("one1", [1]), ints("eight", [8]), ints("two", [2]),
               ints("sixteen", [16])]),
             head("r", 16)]
    nodes, inits = chain(*parts)
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits)
    tr, pruned, kept = prune(m, keep=0.5)
    assert_prunable(tr, "h", 8)
    assert pshape(pruned, "e")[1:] == [4, 2, 8, 8] and pshape(pruned, "r")[1:] == [8, 8, 8]


def test_expand_with_a_computed_entry_it_cannot_follow_freezes():
    """An Expand shape with an entry computed by arithmetic it does not follow (Shape(h)[0] + 0):
    whether pruning changes it is not proved, so the channels freeze, with a reason naming Expand."""
    parts = [stem(),
             ([node("Unsqueeze", ["h", "ax2"], ["u"]), node("Shape", ["h"], ["hs"]),
               node("Slice", ["hs", "zero1", "one1"], ["n"]), node("Add", ["n", "zero1"], ["n0"]),
               node("Concat", ["n0", "eight", "two", "eight", "eight"], ["es"], axis=0),
               node("Expand", ["u", "es"], ["e"]), node("ReduceSum", ["e", "ax2"], ["s"], keepdims=0)],
              [ints("ax2", [2]), ints("zero1", [0]), ints("one1", [1]), ints("eight", [8]), ints("two", [2])]),
             head("s", 8)]
    nodes, inits = chain(*parts)
    m = make_model(nodes, [X], [("y", ["N", 4, 8, 8])], inits, opset=13)
    assert_frozen(traced(m), "h", "Expand")
