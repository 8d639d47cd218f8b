"""The layer matchers alone: each pattern gives a Layer whose (out, in) view reproduces the node's
product (numpy reference), or a Rejection whose reason names what stops it."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.find.layers import analyse_graph, match_conv, match_gemm, match_matmul
from onnxprune.graph.index import GraphIndex, Rejection, read_initializer

RNG = np.random.default_rng(0)


def _model(nodes, inits, inputs=(("x", [2, 4]),), outputs=(("y", None),), opset=17):
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _match(model, matcher, node_name):
    g = GraphIndex(model)
    return matcher(g, g.nodes[node_name])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_view_is_the_products_matrix(trans_b):
    w = RNG.normal(size=(3, 4)).astype(np.float32)  # (out, in)
    stored = w if trans_b else w.T
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)],
                   {"W": stored, "b": np.ones(3)})
    layer = _match(model, match_gemm, "fc")
    assert not isinstance(layer, Rejection)
    assert (layer.out_features, layer.in_features, layer.bias, layer.beta) == (3, 4, "b", 2.0)
    np.testing.assert_allclose(layer.to_rows(read_initializer(model, "W")), 0.5 * w.astype(np.float64))
    np.testing.assert_allclose(layer.bias_shift_to_stored(np.ones(3)), np.full(3, 0.5))  # shifts divide by beta


def test_gemm_with_trans_a_is_rejected_with_its_reason():
    model = _model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1)], {"W": RNG.normal(size=(2, 3))},
                   inputs=(("x", [4, 2]),))
    assert _match(model, match_gemm, "fc") == Rejection("Gemm with transA=1")


def test_matmul_takes_the_add_after_it_as_its_bias_on_either_side():
    for pair in (["mm", "b"], ["b", "mm"]):
        model = _model([helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc"),
                        helper.make_node("Add", pair, ["y"], name="bias")],
                       {"W": RNG.normal(size=(4, 3)), "b": np.zeros(3)})
        layer = _match(model, match_matmul, "fc")
        assert (layer.bias, layer.bias_node, layer.preact, layer.kind) == ("b", "bias", "y", "dense")


def test_matmul_weight_on_the_left_and_graph_input_weights_are_rejected():
    left = _model([helper.make_node("MatMul", ["W", "x"], ["y"], name="fc")], {"W": RNG.normal(size=(3, 2))},
                  inputs=(("x", [2, 4]),))
    assert _match(left, match_matmul, "fc").reason == "weight on the left of MatMul (W @ z) is not supported"
    both_inputs = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], {},
                         inputs=(("x", [2, 4]), ("w", [4, 3])))
    assert _match(both_inputs, match_matmul, "fc").reason == "weight 'w' is a graph input, not an initializer"


def test_a_weight_shared_by_two_nodes_is_rejected_naming_its_users():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"),
                    helper.make_node("MatMul", ["h", "W"], ["y"], name="fc2")], {"W": RNG.normal(size=(4, 4))})
    assert _match(model, match_matmul, "fc1").reason == "weight 'W' is shared by 2 nodes"


def test_weight_behind_transpose_and_dequantize_maps_back_to_its_storage():
    q = RNG.integers(-5, 5, size=(4, 3)).astype(np.int8)  # stored (in, out) as int8
    scale, zero = np.float32(0.1), np.int8(1)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wd"], name="dq"),
         helper.make_node("Transpose", ["Wd"], ["Wt"], name="t"),
         helper.make_node("Gemm", ["x", "Wt"], ["y"], name="fc", transB=1)],
        "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(np.array(scale), "s"),
         numpy_helper.from_array(np.array(zero), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layer = _match(model, match_gemm, "fc")
    assert [s.op for s in layer.weight_path] == ["DequantizeLinear", "Transpose"]
    expected = ((q.astype(np.float64) - 1) * np.float64(scale)).T  # (out, in)
    np.testing.assert_allclose(layer.to_rows(q), expected, rtol=1e-6)
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = True
    pruned = layer.prune_stored(q, mask)
    assert pruned[1, 0] == zero and np.array_equal(np.delete(pruned.ravel(), 3), np.delete(q.ravel(), 3))


def test_conv_without_bias_takes_the_batchnormalization_bias_after_it():
    c = 3
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                    helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["y"], name="bn")],
                   {"W": RNG.normal(size=(c, 2, 3, 3)), "g": [2.0, 1.0, 0.5], "beta": np.zeros(c), "m": np.zeros(c),
                    "v": np.full(c, 3.0)}, inputs=(("x", [1, 2, 5, 5]),))
    layer = _match(model, match_conv, "conv")
    assert (layer.bias, layer.bias_node, layer.kind, layer.in_features) == ("beta", "bn", "conv", 18)
    np.testing.assert_allclose(layer.bias_factors, np.array([2.0, 1.0, 0.5]) / np.sqrt(3.0 + 1e-5))


def test_analyse_graph_lists_unsupported_linear_ops_with_reasons():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
                    helper.make_node("ConvTranspose", ["h4", "K"], ["y"], name="up"),
                    helper.make_node("Reshape", ["h", "shape"], ["h4"], name="r")],
                   {"W": RNG.normal(size=(4, 4)), "K": RNG.normal(size=(1, 1, 2, 2)), "shape": [1, 1, 2, 2]})
    found = analyse_graph(model)
    assert [layer.name for layer in found.layers] == ["fc"]
    assert [(s.node, s.reason) for s in found.skipped] == [("up", "ConvTranspose layers are not supported")]


def test_graph_index_counts_subgraph_reads_as_users():
    then = helper.make_graph([helper.make_node("Identity", ["W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
                    helper.make_node("If", ["cond"], ["o"], name="branch", then_branch=then, else_branch=then)],
                   {"W": RNG.normal(size=(4, 4))}, inputs=(("x", [2, 4]),), outputs=(("y", None), ("o", None)))
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    g = GraphIndex(model)
    assert g.users("W") == 2 and [n.name for n in g.subgraph_readers["W"]] == ["branch"]
    assert _match(model, match_matmul, "fc").reason == "weight 'W' is also read inside the subgraph of If 'branch'"


def test_the_logits_before_a_final_softmax_or_sigmoid_are_protected():
    from onnxprune.find.outputs import protected_output, scored_output

    for op in ("Softmax", "Sigmoid", "LogSoftmax"):
        model = _model([helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc"),
                        helper.make_node(op, ["logits"], ["p"], name="squash"),
                        helper.make_node("Identity", ["p"], ["y"], name="id")], {"W": RNG.normal(size=(4, 3))})
        assert (protected_output(model), scored_output(model)) == ("logits", "y")
        assert protected_output(model, "y") == "y"  # a named output is protected as it is


def test_two_bias_adds_with_one_name_each_give_their_own_layer_its_pre_activation():
    """Node names need not be unique in ONNX: a layer's pre-activation is its own Add's output."""
    model = _model([helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
                    helper.make_node("Add", ["m1", "b1"], ["a1"], name="add"),
                    helper.make_node("Relu", ["a1"], ["h"], name="relu"),
                    helper.make_node("MatMul", ["h", "W2"], ["m2"], name="mm2"),
                    helper.make_node("Add", ["m2", "b2"], ["y"], name="add")],
                   {"W1": RNG.normal(size=(4, 4)), "b1": np.zeros(4), "W2": RNG.normal(size=(4, 3)), "b2": np.zeros(3)})
    assert [(layer.name, layer.preact) for layer in analyse_graph(model).layers] == [("mm1", "a1"), ("mm2", "y")]
