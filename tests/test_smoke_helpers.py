from onnx import helper

from tests.helpers import const, make_model, prune_random


def test_conv_relu_conv_chain_prunes_and_matches():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    m = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])],
                   [const("w1", (16, 3, 3, 3)), const("b1", (16,)), const("w2", (4, 16, 1, 1))])
    tr, pruned, res = prune_random(m)
    w1 = next(i for i in pruned.graph.initializer if i.name == "w1")
    assert w1.dims[0] == 8
