"""Unit groups on tiny graphs: every coupling pattern is found (or rejected with its reason), and the
shrunk model computes what the dense model computes with the removed units replaced by constants."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from unitref import replaced
from unitref import toposort as _toposort  # noqa: F401 - test_structured imports it from here

from onnxprune import runtime
from onnxprune.edit.slicing import remove_units
from onnxprune.find.units import find_units

from studies.zoo import build_resnet, build_transformer

RNG = np.random.default_rng(0)


def _seed(seed=0):
    """Builders draw their weights from a fresh generator, so a model does not depend on test order."""
    global RNG
    RNG = np.random.default_rng(seed)


def _w(name, *shape, scale=0.5):
    return numpy_helper.from_array((RNG.normal(size=shape) * scale).astype(np.float32), name)


def _model(nodes, inits, in_shape, out_shape, opset=17):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_gemm():
    """Gemm (transB=1) -> Relu -> Gemm (transB=0, alpha, beta) -> Tanh -> Gemm."""
    _seed()
    n = helper.make_node
    return _model([n("Gemm", ["x", "W0", "b0"], ["a0"], name="fc0", transB=1), n("Relu", ["a0"], ["h0"], name="r0"),
                   n("Gemm", ["h0", "W1", "b1"], ["a1"], name="fc1", alpha=0.7, beta=1.5),
                   n("Tanh", ["a1"], ["h1"], name="t1"), n("Gemm", ["h1", "W2", "b2"], ["y"], name="fc2", transB=1)],
                  [_w("W0", 6, 5), _w("b0", 6), _w("W1", 6, 7), _w("b1", 7), _w("W2", 3, 7), _w("b2", 3)], ["N", 5], ["N", 3])


def mlp_matmul_prelu():
    """MatMul + Add -> PRelu (one slope per unit) -> per-unit Mul -> MatMul (no bias) -> Sigmoid -> MatMul + Add."""
    _seed()
    n = helper.make_node
    return _model([n("MatMul", ["x", "W0"], ["m0"], name="mm0"), n("Add", ["b0", "m0"], ["a0"], name="add0"),
                   n("PRelu", ["a0", "slope"], ["p0"], name="prelu0"), n("Mul", ["p0", "scale"], ["h0"], name="mul0"),
                   n("MatMul", ["h0", "W1"], ["a1"], name="mm1"), n("Sigmoid", ["a1"], ["h1"], name="s1"),
                   n("MatMul", ["h1", "W2"], ["m2"], name="mm2"), n("Add", ["m2", "b2"], ["y"], name="add2")],
                  [_w("W0", 5, 6), _w("b0", 6), _w("slope", 6), _w("scale", 6), _w("W1", 6, 4), _w("W2", 4, 3),
                   _w("b2", 3)], ["N", 5], ["N", 3])


def cnn(flatten="Flatten", bn=False, depthwise=False, pool="MaxPool"):
    """Conv -> [BatchNormalization] -> Relu -> [per-channel Add] -> pool -> [depthwise Conv] -> Conv -> Relu
    -> Flatten or Reshape -> Gemm. No padding: a constant channel folds exactly into the next bias."""
    _seed()
    n = helper.make_node
    nodes = [n("Reshape", ["x", "img"], ["x4"], name="to_img"), n("Conv", ["x4", "C0"], ["c0"], name="conv0",
                                                                     kernel_shape=[3, 3])]
    inits = [numpy_helper.from_array(np.array([-1, 2, 9, 9], np.int64), "img"), _w("C0", 4, 2, 3, 3)]
    t = "c0"
    if bn:
        nodes.append(n("BatchNormalization", [t, "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn0"))
        inits += [_w("bn_s", 4), _w("bn_b", 4), _w("bn_m", 4),
                  numpy_helper.from_array(RNG.uniform(0.5, 2, 4).astype(np.float32), "bn_v")]
        t = "bn"
    else:
        nodes.append(n("Add", [t, "cb0"], ["c0b"], name="bias0"))
        inits.append(_w("cb0", 1, 4, 1, 1))
        t = "c0b"
    nodes += [n("Relu", [t], ["r0"], name="relu0"), n("Add", ["r0", "shift"], ["r0s"], name="shift0"),
              n(pool, ["r0s"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[1, 1])]
    inits.append(_w("shift", 4, 1, 1))
    t = "p0"
    if depthwise:
        nodes.append(n("Conv", [t, "D", "db"], ["d0"], name="dw", kernel_shape=[2, 2], group=4))
        inits += [_w("D", 4, 1, 2, 2), _w("db", 4)]
        t = "d0"
    nodes += [n("Conv", [t, "C1", "cb1"], ["c1"], name="conv1", kernel_shape=[3, 3]), n("Relu", ["c1"], ["r1"], name="relu1")]
    inits += [_w("C1", 5, 4, 3, 3), _w("cb1", 5)]
    side = 9 - 2 - 1 - (1 if depthwise else 0) - 2
    if flatten == "Flatten":
        nodes.append(n("Flatten", ["r1"], ["f"], name="flat"))
    else:
        nodes.append(n("Reshape", ["r1", "fshape"], ["f"], name="flat"))
        inits.append(numpy_helper.from_array(np.array([-1, 5 * side * side], np.int64), "fshape"))
    nodes.append(n("Gemm", ["f", "G", "gb"], ["y"], name="fc", transB=1))
    inits += [_w("G", 3, 5 * side * side, scale=0.2), _w("gb", 3)]
    return _model(nodes, inits, ["N", 162], ["N", 3])


def sequence_ffn():
    """A transformer FFN on (batch, sequence, features): MatMul + Add -> Gelu -> MatMul + Add."""
    _seed()
    n = helper.make_node
    return _model([n("MatMul", ["x", "W0"], ["m0"], name="up"), n("Add", ["m0", "b0"], ["a0"], name="up_bias"),
                   n("Gelu", ["a0"], ["h0"], name="gelu"), n("MatMul", ["h0", "W1"], ["m1"], name="down"),
                   n("Add", ["m1", "b1"], ["y"], name="down_bias")],
                  [_w("W0", 4, 8), _w("b0", 8), _w("W1", 8, 4), _w("b1", 4)], ["N", 3, 4], ["N", 3, 4], opset=20)


def _inputs(model, n=6):
    vi = model.graph.input[0]
    shape = [n] + [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
    return {vi.name: RNG.normal(size=shape).astype(np.float32)}


def residual_mlp():
    """fc0 -> Relu -> h0; s = fc1(h0) + h0 (a residual stream: fc0 and fc1 share its mask) -> Relu -> fc2,
    plus a second block s2 = fc3(relu(s)) + s read by fc4."""
    _seed()
    n = helper.make_node
    return _model([n("Gemm", ["x", "W0", "b0"], ["a0"], name="fc0", transB=1), n("Relu", ["a0"], ["h0"], name="r0"),
                   n("Gemm", ["h0", "W1", "b1"], ["a1"], name="fc1", transB=1), n("Add", ["a1", "h0"], ["s"], name="res1"),
                   n("Relu", ["s"], ["rs"], name="r1"), n("Gemm", ["rs", "W3", "b3"], ["a3"], name="fc3", transB=1),
                   n("Add", ["s", "a3"], ["s2"], name="res2"), n("Gemm", ["s2", "W4"], ["y"], name="fc4", transB=1)],
                  [_w("W0", 6, 5), _w("b0", 6), _w("W1", 6, 6), _w("b1", 6), _w("W3", 6, 6), _w("b3", 6), _w("W4", 3, 6)],
                  ["N", 5], ["N", 3])


def residual_cnn():
    """conv0 -> BatchNormalization -> Relu; two residual blocks of 1x1 Convs (r + conv(relu(conv(r))))
    -> GlobalAveragePool -> Flatten -> Gemm: conv0 and both blocks' second Convs share one mask."""
    _seed()
    n = helper.make_node
    nodes = [n("Reshape", ["x", "img"], ["x4"], name="to_img"),
             n("Conv", ["x4", "C0"], ["c0"], name="conv0", kernel_shape=[1, 1]),
             n("BatchNormalization", ["c0", "s", "b", "m", "v"], ["bn"], name="bn0"), n("Relu", ["bn"], ["r0"], name="relu0")]
    inits = [numpy_helper.from_array(np.array([-1, 2, 4, 4], np.int64), "img"), _w("C0", 4, 2, 1, 1), _w("s", 4), _w("b", 4),
             _w("m", 4), numpy_helper.from_array(RNG.uniform(0.5, 2, 4).astype(np.float32), "v")]
    stream = "r0"
    for k in (1, 2):
        nodes += [n("Conv", [stream, f"A{k}", f"ab{k}"], [f"ca{k}"], name=f"block{k}a", kernel_shape=[1, 1]),
                  n("Relu", [f"ca{k}"], [f"ra{k}"], name=f"relu{k}"),
                  n("Conv", [f"ra{k}", f"B{k}", f"bb{k}"], [f"cb{k}"], name=f"block{k}b", kernel_shape=[1, 1]),
                  n("Add", [stream, f"cb{k}"], [f"res{k}"], name=f"add{k}")]
        inits += [_w(f"A{k}", 3, 4, 1, 1), _w(f"ab{k}", 3), _w(f"B{k}", 4, 3, 1, 1), _w(f"bb{k}", 4)]
        stream = f"res{k}"
    nodes += [n("GlobalAveragePool", [stream], ["gap"], name="gap"), n("Flatten", ["gap"], ["f"], name="flat"),
              n("Gemm", ["f", "G", "gb"], ["y"], name="fc", transB=1)]
    inits += [_w("G", 3, 4), _w("gb", 3)]
    return _model(nodes, inits, ["N", 32], ["N", 3])


def attention(heads=2, size=3, width=5):
    """Self-attention on (batch, sequence, width): Q, K, V projections split into heads, softmax(Q K^T /
    sqrt(d)) V, heads merged, output projection, then an FFN-style MatMul."""
    _seed()
    n = helper.make_node
    hd = heads * size
    nodes, inits = [], [numpy_helper.from_array(np.array([0, 0, heads, size], np.int64), f"split_{p}") for p in "qkv"]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [n("MatMul", ["x", f"W{p}"], [f"{p}m"], name=f"{p}_proj"),
                  n("Add", [f"{p}m", f"b{p}"], [f"{p}a"], name=f"{p}_bias"),
                  n("Reshape", [f"{p}a", f"split_{p}"], [f"{p}r"], name=f"{p}_split"),
                  n("Transpose", [f"{p}r"], [f"{p}h"], name=f"{p}_heads", perm=perm)]
        inits += [_w(f"W{p}", width, hd), _w(f"b{p}", hd)]
    nodes += [n("MatMul", ["qh", "kh"], ["scores"], name="qk"), n("Div", ["scores", "scale"], ["scaled"], name="scale"),
              n("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1), n("MatMul", ["probs", "vh"], ["ctx_h"], name="pv"),
              n("Transpose", ["ctx_h"], ["ctx_t"], name="merge_t", perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx_t", "merge"], ["ctx"], name="merge"), n("MatMul", ["ctx", "Wo"], ["om"], name="o_proj"),
              n("Add", ["om", "bo"], ["o"], name="o_bias"), n("Relu", ["o"], ["h"], name="relu"),
              n("MatMul", ["h", "Wf"], ["y"], name="ffn")]
    inits += [numpy_helper.from_array(np.array(np.sqrt(size), np.float32), "scale"),
              numpy_helper.from_array(np.array([0, 0, hd], np.int64), "merge"), _w("Wo", hd, width), _w("bo", width),
              _w("Wf", width, 3)]
    return _model(nodes, inits, ["N", 4, width], ["N", 4, 3])


def concat_mlp():
    """fc0 (4) and fc1 (3) -> Relu / Tanh -> Concat with two input features -> per-feature Mul -> fc2:
    each producer keeps its own group, cut at its offset among the 9 features."""
    _seed()
    n = helper.make_node
    return _model([n("Gemm", ["x", "W0", "b0"], ["a0"], name="fc0", transB=1), n("Relu", ["a0"], ["h0"], name="r0"),
                   n("Gemm", ["x", "W1", "b1"], ["a1"], name="fc1", transB=1), n("Tanh", ["a1"], ["h1"], name="t1"),
                   n("Slice", ["x", "st", "en", "ax"], ["k"], name="first_two"),
                   n("Concat", ["h0", "k", "h1"], ["c"], name="cat", axis=-1), n("Mul", ["c", "s"], ["cs"], name="scale"),
                   n("Gemm", ["cs", "W2", "b2"], ["y"], name="fc2", transB=1)],
                  [_w("W0", 4, 5), _w("b0", 4), _w("W1", 3, 5), _w("b1", 3),
                   *[numpy_helper.from_array(np.array([v], np.int64), name) for name, v in (("st", 0), ("en", 2), ("ax", 1))],
                   _w("s", 9), _w("W2", 3, 9), _w("b2", 3)],
                  ["N", 5], ["N", 3])


def concat_cnn():
    """Two padded 3x3 Convs of one image -> Concat on the channels -> BatchNormalization -> Relu ->
    MaxPool -> Conv -> Flatten -> Gemm (an Inception-style join)."""
    _seed()
    n = helper.make_node
    nodes = [n("Reshape", ["x", "img"], ["x4"], name="to_img"),
             n("Conv", ["x4", "A", "ab"], ["ca"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             n("Conv", ["x4", "B"], ["cb"], name="conv_b", kernel_shape=[1, 1]),
             n("Concat", ["ca", "cb"], ["c"], name="cat", axis=1),
             n("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"], name="bn"), n("Relu", ["bn"], ["r"], name="relu"),
             n("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p", "C", "cbias"], ["cc"], name="conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             n("Relu", ["cc"], ["rc"], name="relu_c"), n("Flatten", ["rc"], ["f"], name="flat"),
             n("Gemm", ["f", "G", "gb"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(np.array([-1, 2, 6, 6], np.int64), "img"), _w("A", 4, 2, 3, 3), _w("ab", 4),
             _w("B", 3, 2, 1, 1), _w("s", 7), _w("bb", 7), _w("m", 7),
             numpy_helper.from_array(RNG.uniform(0.5, 2, 7).astype(np.float32), "v"),
             _w("C", 5, 7, 3, 3), _w("cbias", 5), _w("G", 3, 5 * 9), _w("gb", 3)]
    return _model(nodes, inits, ["N", 72], ["N", 3])


def grouped_cnn():
    """conv0 (6 channels) -> Relu -> conv1 with groups=2 (4 outputs) -> Relu -> Flatten -> Gemm: conv0's
    channels are read in two groups and conv1 writes two groups, so each group keeps as many."""
    _seed()
    n = helper.make_node
    return _model([n("Reshape", ["x", "img"], ["x4"], name="to_img"),
                   n("Conv", ["x4", "C0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3]), n("Relu", ["c0"], ["r0"], name="r0"),
                   n("Conv", ["r0", "C1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], group=2),
                   n("Relu", ["c1"], ["r1"], name="r1"), n("Flatten", ["r1"], ["f"], name="flat"),
                   n("Gemm", ["f", "G"], ["y"], name="fc", transB=1)],
                  [numpy_helper.from_array(np.array([-1, 2, 7, 7], np.int64), "img"), _w("C0", 6, 2, 3, 3), _w("b0", 6),
                   _w("C1", 4, 3, 3, 3), _w("b1", 4), _w("G", 3, 4 * 9)], ["N", 98], ["N", 3])


PATTERNS = {
    "grouped-conv": (grouped_cnn, {"conv0": ["conv1"], "conv1": ["fc"]}),
    "concat-dense": (concat_mlp, {"fc0": ["fc2"], "fc1": ["fc2"]}),
    "concat-conv-bn-maxpool-padded-conv": (concat_cnn, {"conv_a": ["conv_c"], "conv_b": ["conv_c"], "conv_c": ["fc"]}),
    "attention-heads": (attention, {"heads:o_proj": ["o_proj"], "o_proj": ["ffn"]}),
    "residual-conv-blocks": (residual_cnn, {"conv0": ["block1a", "block2a", "fc"], "block1a": ["block1b"],
                                            "block2a": ["block2b"]}),
    "residual-add-stream": (residual_mlp, {"fc0": ["fc1", "fc3", "fc4"]}),
    "gemm-relu-gemm": (mlp_gemm, {"fc0": ["fc1"], "fc1": ["fc2"]}),
    "matmul-prelu-mul-matmul": (mlp_matmul_prelu, {"mm0": ["mm1"], "mm1": ["mm2"]}),
    "conv-relu-add-maxpool-conv-flatten-gemm": (cnn, {"conv0": ["conv1"], "conv1": ["fc"]}),
    "conv-bn-relu-averagepool-conv-reshape-gemm": (lambda: cnn("Reshape", bn=True, pool="AveragePool"),
                                                   {"conv0": ["conv1"], "conv1": ["fc"]}),
    "conv-maxpool-depthwise-conv": (lambda: cnn(depthwise=True), {"conv0": ["conv1"], "conv1": ["fc"]}),
    "sequence-ffn-gelu": (sequence_ffn, {"up": ["down"]}),
    # the trained models' builders, tiny: two residual streams joined by a stride-2 Conv; pre-norm
    # encoder blocks whose stream (through LayerNormalization) is skipped, heads and FFN units kept
    "zoo-resnet": (lambda: build_resnet(widths=(4, 6), side=8, classes=3),
                   {"stem": ["block1a", "down2"], "block1a": ["block1b"], "down2": ["block2a", "fc"], "block2a": ["block2b"]}),
    "zoo-transformer": (lambda: build_transformer(width=8, heads=2, ffn=6, blocks=2, patch=4, side=8, classes=3),
                        {"heads:block1.o": ["block1.o"], "heads:block2.o": ["block2.o"], "block1.ffn1": ["block1.ffn2"],
                         "block2.ffn1": ["block2.ffn2"]}),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_shrinks_to_the_masked_model(pattern):
    build, expected = PATTERNS[pattern]
    model = build()
    groups = find_units(model).by_name()
    assert {name: [c.layer for c in g.consumers] for name, g in groups.items()} == expected
    feeds = _inputs(model)
    for name, group in groups.items():
        lane = group.units // group.lanes  # a grouped Conv's groups each lose as many
        removed = np.sort(np.concatenate([k * lane + RNG.choice(lane, size=lane // 2, replace=False)
                                          for k in range(group.lanes)]))
        constants = RNG.normal(size=group.units)
        shrunk = remove_units(model, {name: removed}, {name: constants})
        onnx.checker.check_model(shrunk, full_check=True)
        assert [i.name for i in shrunk.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in shrunk.graph.output] == [o.name for o in model.graph.output]
        reference = replaced(model, group, removed, constants)
        got = runtime.make_session(shrunk).run(None, feeds)[0]
        want = runtime.make_session(reference).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert sum(int(np.prod(t.dims)) for t in shrunk.graph.initializer) < \
            sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_all_groups_at_once_keep_names_and_dtypes():
    model = cnn(depthwise=True)
    groups = find_units(model).by_name()
    removed = {"conv0": np.array([1, 2]), "conv1": np.array([0, 3, 4])}
    shrunk = remove_units(model, removed, {k: np.zeros(groups[k].units) for k in removed})
    before = {t.name: t for t in model.graph.initializer}
    after = {t.name: t for t in shrunk.graph.initializer}
    assert set(before) == set(after) and all(after[k].data_type == before[k].data_type for k in before)
    assert list(after["C0"].dims) == [2, 2, 3, 3] and list(after["D"].dims) == [2, 1, 2, 2]
    assert list(after["C1"].dims) == [2, 2, 3, 3] and list(after["G"].dims) == [3, 2 * 9]
    dw = next(n for n in shrunk.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 2
    assert shrunk.opset_import == model.opset_import
    runtime.make_session(shrunk).run(None, _inputs(shrunk))


def test_every_group_at_once_on_the_residual_cnn():
    """All groups removed together (padded Convs whose border maps are then sliced with their own
    channels): the masked dense model with every group replaced."""
    model = build_resnet(widths=(4, 6), side=8, classes=3)
    groups = find_units(model).by_name()
    removed = {n: np.sort(RNG.choice(g.units, g.units // 2, replace=False)) for n, g in groups.items()}
    constants = {n: RNG.normal(size=g.units) for n, g in groups.items()}
    shrunk = remove_units(model, removed, constants)
    onnx.checker.check_model(shrunk, full_check=True)
    reference = model
    for k, (name, group) in enumerate(groups.items()):
        reference = replaced(reference, group, removed[name], constants[name], prefix=f"g{k}_")
    feeds = _inputs(model)
    np.testing.assert_allclose(runtime.make_session(shrunk).run(None, feeds)[0],
                               runtime.make_session(reference).run(None, feeds)[0], atol=1e-5, rtol=1e-5)


def test_reshape_constant_follows_the_channels():
    model = cnn("Reshape")
    shrunk = remove_units(model, {"conv1": np.array([0, 1])}, None)
    shape = numpy_helper.to_array(next(t for t in shrunk.graph.initializer if t.name == "fshape"))
    assert shape.tolist() == [-1, 3 * 16]  # 5 -> 3 channels of 4 x 4 positions


def _rejected(model):
    return {r.node: r.reason for r in find_units(model).rejected}


def test_what_cannot_go_is_rejected_with_its_reason():
    n = helper.make_node
    from_input = _model([n("Gemm", ["x", "W0", "b0"], ["a0"], name="fc0", transB=1), n("Add", ["a0", "x"], ["s"]),
                         n("Gemm", ["s", "W2"], ["y"], name="fc2", transB=1)],
                        [_w("W0", 5, 5), _w("b0", 5), _w("W2", 3, 5)], ["N", 5], ["N", 3])
    reasons = _rejected(from_input)
    assert "graph input" in reasons["fc0"] and "graph output" in reasons["fc2"]
    stream = find_units(build_transformer(width=8, heads=2, ffn=6, blocks=1, patch=4, side=8, classes=3)).rejected
    why = {r.node: r for r in stream}
    assert all(why[name].unavoidable and "the residual stream of LayerNormalization" in why[name].reason
               for name in ("embed", "block1.o", "block1.ffn2"))


def two_producers(join):
    """fc0 and fc1 of 4 units each joined by ``join``: a gate (fc0 * sigmoid(fc1)), a Concat along the
    batch, or a Concat along the features added to fc3's 8 outputs; then fc2."""
    n = helper.make_node
    nodes = [n("Gemm", ["x", "W0", "b0"], ["a0"], name="fc0", transB=1),
             n("Gemm", ["x", "W1", "b1"], ["a1"], name="fc1", transB=1)]
    inits = [_w("W0", 4, 5), _w("b0", 4), _w("W1", 4, 5), _w("b1", 4)]
    if join == "gate":
        nodes += [n("Sigmoid", ["a1"], ["g"]), n("Mul", ["a0", "g"], ["m"])]
        width, out = 4, ["N", 3]
    elif join == "batch":
        nodes.append(n("Concat", ["a0", "a1"], ["m"], axis=0))
        width, out = 4, ["M", 3]
    else:
        nodes += [n("Concat", ["a0", "a1"], ["c"], axis=1), n("Gemm", ["x", "W3", "b3"], ["a3"], name="fc3", transB=1),
                  n("Add", ["c", "a3"], ["m"])]
        inits += [_w("W3", 8, 5), _w("b3", 8)]
        width, out = 8, ["N", 3]
    nodes.append(n("Gemm", ["m", "W2", "b2"], ["y"], name="fc2", transB=1))
    return _model(nodes, inits + [_w("W2", 3, width), _w("b2", 3)], ["N", 5], out)


@pytest.mark.parametrize("join, producers", [("gate", {"fc0": ("fc0", "fc1")}), ("batch", {"fc0": ("fc0", "fc1")}),
                                             ("features", {"fc0": ("fc0", "fc3"), "fc1": ("fc1", "fc3")})])
def test_layers_joined_on_the_same_units_share_a_group(join, producers):
    from couplings import shrinks_to_masked

    model = two_producers(join)
    groups = find_units(model).by_name()
    assert {name: groups[name].producers for name in producers} == producers
    for name in producers:
        shrinks_to_masked(model, name)


def test_inspect_lists_groups_and_rejections():
    import onnxprune

    report = onnxprune.inspect(mlp_gemm())
    assert [g["group"] for g in report["units"]["groups"]] == ["fc0", "fc1"]
    assert report["units"]["rejected"][0]["node"] == "fc2"


def test_input_features_by_a_contiguous_slice_keep_the_inputs():
    model = mlp_gemm()
    group = find_units(model, inputs="slice").by_name()["input:x"]
    assert [c.layer for c in group.consumers] == ["fc0"] and group.selection == "Slice"
    removed, constants = np.array([0, 4]), RNG.normal(size=5)
    shrunk = remove_units(model, {"input:x": removed}, {"input:x": constants}, inputs="slice")
    onnx.checker.check_model(shrunk, full_check=True)
    assert shrunk.graph.input == model.graph.input and shrunk.graph.node[0].op_type == "Slice"
    feeds = _inputs(model)
    want = runtime.make_session(replaced(model, group, removed, constants)).run(None, feeds)[0]
    np.testing.assert_allclose(runtime.make_session(shrunk).run(None, feeds)[0], want, atol=1e-5, rtol=1e-5)
    again = remove_units(shrunk, {"input:x": np.array([2])}, None)  # narrowed, not a second Slice
    assert [n.op_type for n in again.graph.node].count("Slice") == 1
    starts = numpy_helper.to_array(next(t for t in again.graph.initializer if t.name.endswith("__starts")))
    assert starts.tolist() == [1] and list(next(t for t in again.graph.initializer if t.name == "W0").dims) == [6, 2]


def test_pruned_inputs_change_the_input_contract():
    from onnxprune.edit.slicing import input_contract

    model = mlp_gemm()
    group = find_units(model, inputs="gather").by_name()["input:x"]
    removed, constants = np.array([1, 3]), RNG.normal(size=5)
    gathered = remove_units(model, {"input:x": removed}, {"input:x": constants}, inputs="gather")
    contract, kept = input_contract(gathered)
    onnx.checker.check_model(contract, full_check=True)
    assert kept == {"x": [0, 2, 4]} and contract.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert json.loads({p.key: p.value for p in contract.metadata_props}["onnxprune.kept_input_features"]) == kept
    feeds = _inputs(model)
    want = runtime.make_session(replaced(model, group, removed, constants)).run(None, feeds)[0]
    got = runtime.make_session(contract).run(None, {"x": feeds["x"][:, kept["x"]]})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_inputs_read_by_other_nodes_are_not_units():
    reasons = {r.node: r.reason for r in find_units(cnn(), inputs="slice").rejected}
    assert "Reshape" in reasons["input:x"]
