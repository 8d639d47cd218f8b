"""Couplings found by walking the graph, each on a tiny graph in the spellings exporters write: the group
has the producers and consumers it must have, and the shrunk model equals the dense model reading the
removed units as their constants (to 1e-5), passes onnx.checker's full check and runs on onnxruntime."""
import math

import numpy as np
import pytest
from couplings import Graph, all_at_once, consumers, feeds, find_units, reasons, shrinks_to_masked
from onnx import TensorProto, helper, numpy_helper


# ------------------------------------------------------------------ activations: functions of the unit itself
def silu(g, x, name):
    return g.add("Mul", [x, g.add("Sigmoid", [x], f"{name}.sigmoid")], name)


def silu_swapped(g, x, name):
    return g.add("Mul", [g.add("Sigmoid", [x], f"{name}.sigmoid"), x], name)


def hardswish_op(g, x, name):
    return g.add("HardSwish", [x], name)


def hardswish_hardsigmoid(g, x, name):  # torch's dynamo exporter
    return g.add("Mul", [x, g.add("HardSigmoid", [x], f"{name}.hsig", alpha=1 / 6, beta=0.5)], name)


def hardswish_relu6(g, x, name):  # x * relu6(x + 3) / 6 with Constant nodes (legacy exporter, paddle2onnx)
    shifted = g.add("Add", [x, g.constant_node(3.0)], f"{name}.add")
    clipped = g.add("Clip", [shifted, g.constant_node(0.0), g.constant_node(6.0)], f"{name}.clip")
    return g.add("Div", [g.add("Mul", [x, clipped], f"{name}.mul"), g.constant_node(6.0)], name)


def mish(g, x, name):
    return g.add("Mul", [x, g.add("Tanh", [g.add("Softplus", [x], f"{name}.sp")], f"{name}.tanh")], name)


def gelu_erf_constants(g, x, name):  # x * 0.5 * (1 + erf(x / sqrt 2)), legacy exporter
    erf = g.add("Erf", [g.add("Div", [x, g.constant_node(math.sqrt(2))], f"{name}.div")], f"{name}.erf")
    half = g.add("Mul", [x, g.add("Add", [erf, g.constant_node(1.0)], f"{name}.add")], f"{name}.mul")
    return g.add("Mul", [half, g.constant_node(0.5)], name)


def gelu_erf_shared(g, x, name):  # dynamo: scalars are initializers, shared by every GELU of the model
    if "sqrt2" not in {t.name for t in g.inits}:
        g.const("sqrt2", math.sqrt(2)), g.const("one", 1.0), g.const("half", 0.5)
    erf = g.add("Erf", [g.add("Div", [x, "sqrt2"], f"{name}.div")], f"{name}.erf")
    return g.add("Mul", [x, g.add("Mul", ["half", g.add("Add", [erf, "one"], f"{name}.add")], f"{name}.half")], name)


def gelu_tanh(g, x, name):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    cube = g.add("Mul", [g.add("Pow", [x, g.constant_node(3.0)], f"{name}.pow"), g.constant_node(0.044715)], f"{name}.c")
    inner = g.add("Mul", [g.add("Add", [x, cube], f"{name}.sum"), g.constant_node(math.sqrt(2 / math.pi))], f"{name}.in")
    one = g.add("Add", [g.add("Tanh", [inner], f"{name}.tanh"), g.constant_node(1.0)], f"{name}.one")
    return g.add("Mul", [g.add("Mul", [x, g.constant_node(0.5)], f"{name}.half"), one], name)


def relu6_initializers(g, x, name):
    return g.add("Clip", [x, g.const(f"{name}.lo", 0.0), g.const(f"{name}.hi", 6.0)], name)


def relu6_constant_nodes(g, x, name):
    return g.add("Clip", [x, g.constant_node(0.0), g.constant_node(6.0)], name)


ACTIVATIONS = {f.__name__: f for f in (silu, silu_swapped, hardswish_op, hardswish_hardsigmoid, hardswish_relu6, mish,
                                       gelu_erf_constants, gelu_erf_shared, gelu_tanh, relu6_initializers,
                                       relu6_constant_nodes)}


def cnn_with(act):
    """conv0 -> act -> conv1 (padded) -> act -> GlobalAveragePool -> Flatten -> Gemm."""
    g = Graph()
    a = act(g, g.conv("x", "conv0", 2, 6, k=3, pads=1), "act0")
    b = act(g, g.conv(a, "conv1", 6, 4, k=3, pads=1), "act1")
    flat = g.add("Flatten", [g.add("GlobalAveragePool", [b], "gap")], "flat")
    g.add("Gemm", [flat, g.w("fc.w", 3, 4), g.w("fc.b", 3)], "fc", "y", transB=1)
    return g.model(["N", 2, 6, 6], "y", ["N", 3], opset=18)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_a_function_of_the_unit_itself_is_its_activation(name):
    model = cnn_with(ACTIVATIONS[name])
    assert consumers(model) == {"conv0": ["conv1"], "conv1": ["fc"]}
    shrinks_to_masked(model, "conv0")
    shrinks_to_masked(model, "conv1")


def test_no_activation_is_called_a_residual_or_gated_connection():
    for act in ACTIVATIONS.values():
        assert not any("residual or gated" in r.reason for r in reasons(cnn_with(act)).values())


# ------------------------------------------------------------------ squeeze-excitation
def se_model(variant):
    """conv0 -> ReLU -> x * gate(x) -> conv1 -> GAP -> Gemm, the gate a per-channel function of pooled x:
    ``conv`` (torchvision legacy), ``mean`` (dynamo: ReduceMean, SiLU inside), ``gemm`` (keras2onnx: Flatten,
    Gemm, HardSigmoid, Reshape back), ``paddle`` (the last layer's bias added after a Reshape)."""
    g = Graph()
    x = g.add("Relu", [g.conv("x", "conv0", 2, 8, k=3, pads=1)], "relu0")
    if variant == "mean":
        pooled = g.add("ReduceMean", [x, g.const("axes", [2, 3], np.int64)], "pool", keepdims=1)
    else:
        pooled = g.add("GlobalAveragePool", [x], "pool")
    if variant == "gemm":
        hidden = g.add("Relu", [g.add("Gemm", [g.add("Flatten", [pooled], "squeeze"), g.w("fc1.w", 3, 8), g.w("fc1.b", 3)],
                                      "fc1", transB=1)], "se.relu")
        gate = g.add("HardSigmoid", [g.add("Gemm", [hidden, g.w("fc2.w", 8, 3), g.w("fc2.b", 8)], "fc2", transB=1)], "gate2")
        gate = g.add("Reshape", [gate, g.const("gate_shape", [-1, 8, 1, 1], np.int64)], "gate")
    else:
        hidden = g.conv(pooled, "fc1", 8, 3)
        hidden = silu(g, hidden, "se.act") if variant == "mean" else g.add("Relu", [hidden], "se.act")
        fc2 = g.conv(hidden, "fc2", 3, 8, bias=variant != "paddle")
        if variant == "paddle":
            fc2 = g.add("Add", [fc2, g.add("Reshape", [g.w("fc2.offset", 8), g.const("offset_shape", [1, 8, 1, 1], np.int64)],
                                           "fc2.bias")], "fc2.biased")
        gate = g.add("Sigmoid", [fc2], "gate")
    y = g.add("Relu", [g.conv(g.add("Mul", [x, gate], "excite"), "conv1", 8, 4, k=3, pads=1)], "relu1")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [y], "gap")], "flat"), g.w("fc.w", 3, 4)], "fc", "y", transB=1)
    return g.model(["N", 2, 5, 5], "y", ["N", 3], opset=18)


@pytest.mark.parametrize("variant", ["conv", "mean", "gemm", "paddle"])
def test_squeeze_excitation_couples_the_unit_with_its_gate(variant):
    model = se_model(variant)
    groups = find_units(model).by_name()
    assert groups["conv0"].producers == ("conv0", "fc2")  # the gate's row of the SE's last layer
    assert [c.layer for c in groups["conv0"].consumers] == ["fc1", "conv1"]  # and the SE's first layer's column
    assert consumers(model)["fc1"] == ["fc2"]
    for name in ("conv0", "fc1", "conv1"):
        shrinks_to_masked(model, name)


# ------------------------------------------------------------------ gated FFNs
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_a_gated_ffn_unit_is_a_row_of_gate_and_up_and_a_column_of_down(act):
    """SwiGLU / GeGLU on (batch, sequence, features): act(x W_g) * (x W_u) then W_d."""
    g = Graph()
    gate = g.add("Add", [g.add("MatMul", ["x", g.w("Wg", 4, 6)], "gate"), g.w("bg", 6)], "gate.bias")
    gate = silu(g, gate, "act") if act == "silu" else g.add("Gelu", [gate], "act")
    up = g.add("Add", [g.add("MatMul", ["x", g.w("Wu", 4, 6)], "up"), g.w("bu", 6)], "up.bias")
    h = g.add("Mul", [gate, up], "glu")
    g.add("Add", [g.add("MatMul", [h, g.w("Wd", 6, 4)], "down"), g.w("bd", 4)], "down.bias", "y")
    model = g.model(["N", 3, 4], "y", ["N", 3, 4], opset=20)
    group = find_units(model).by_name()["gate"]
    assert group.producers == ("gate", "up") and [c.layer for c in group.consumers] == ["down"]
    shrinks_to_masked(model, "gate")


# ------------------------------------------------------------------ depthwise chains
def inverted_residual():
    """MobileNetV2: stem -> [expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1] + stem -> head,
    BatchNormalization after every Conv, ReLU6 as Clip with Constant-node bounds."""
    g = Graph()

    def bn(x, name, c):
        var = g.const(f"{name}.var", g.rng.uniform(0.5, 2, c))
        return g.add("BatchNormalization", [x, g.w(f"{name}.s", c), g.w(f"{name}.b", c), g.w(f"{name}.m", c), var], name)

    stem = relu6_constant_nodes(g, bn(g.conv("x", "stem", 2, 4, k=3, pads=1, bias=False), "bn0", 4), "r0")
    e = relu6_constant_nodes(g, bn(g.conv(stem, "expand", 4, 8, bias=False), "bn1", 8), "r1")
    d = relu6_constant_nodes(g, bn(g.conv(e, "dw", 8, 8, k=3, pads=1, group=8, bias=False), "bn2", 8), "r2")
    p = bn(g.conv(d, "project", 8, 4, bias=False), "bn3", 4)
    head = g.add("Relu", [g.conv(g.add("Add", [stem, p], "residual"), "head", 4, 6)], "r4")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [head], "gap")], "flat"), g.w("fc.w", 3, 6)], "fc", "y", transB=1)
    return g.model(["N", 2, 5, 5], "y", ["N", 3])


def test_a_depthwise_chain_is_one_group_and_the_residual_stream_another():
    model = inverted_residual()
    units = find_units(model)
    groups = units.by_name()
    assert groups["stem"].producers == ("stem", "project")
    assert [c.layer for c in groups["stem"].consumers] == ["expand", "head"]
    assert [c.layer for c in groups["expand"].consumers] == ["project"] and groups["expand"].group_attributes == ("dw",)
    assert "dw" not in {r.node for r in units.rejected}
    for name in ("stem", "expand", "head"):
        shrinks_to_masked(model, name)


# ------------------------------------------------------------------ Split and Slice along the channels
def c2f(stem=False):
    """YOLOv8's C2f: cv1 -> SiLU -> Split in halves; m(y1) = y1 + cv2(cv1(y1)); Concat(y0, y1, m(y1)) -> cv2;
    with ``stem`` a Conv + SiLU before it (cv1 then reads the stem's units)."""
    g = Graph()
    source = silu(g, g.conv("x", "stem", 2, 8), "act0") if stem else "x"
    a = silu(g, g.conv(source, "cv1", 8 if stem else 2, 8), "act1")
    g.nodes.append(helper.make_node("Split", [a, g.const("halves", [4, 4], np.int64)], ["y0", "y1"], name="split", axis=1))
    inner = silu(g, g.conv("y1", "m.cv1", 4, 4, k=3, pads=1), "m.act1")
    m = g.add("Add", ["y1", silu(g, g.conv(inner, "m.cv2", 4, 4, k=3, pads=1), "m.act2")], "m")
    out = silu(g, g.conv(g.add("Concat", ["y0", "y1", m], "cat", axis=1), "cv2", 12, 6), "act2")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [out], "gap")], "flat"), g.w("fc.w", 3, 6)], "fc", "y", transB=1)
    return g.model(["N", 2, 5, 5], "y", ["N", 3])


def test_a_split_divides_a_layer_into_groups_and_a_concat_reads_units_twice():
    model = c2f()
    groups = find_units(model).by_name()
    assert set(groups) == {"cv1[0]", "cv1[1]", "m.cv1", "cv2"}  # the two halves of cv1's channels
    assert groups["cv1[1]"].producers == ("cv1", "m.cv2")
    readers = [(c.layer, c.offset) for c in groups["cv1[1]"].consumers]
    assert readers == [("m.cv1", 0), ("cv2", 4), ("cv2", 8)]  # y1 and m(y1) hold the same units
    for name in groups:
        shrinks_to_masked(model, name)


def test_slices_of_the_channels_that_are_added_back_are_one_unit():
    """An STFT's real and imaginary halves: |z|^2 = re^2 + im^2 couples rows j and j + 4 of one Conv."""
    g = Graph()
    c = g.conv("x", "stft", 2, 8, bias=False)
    starts, ends, axes = (g.const(name, [v], np.int64) for name, v in (("s0", 0), ("e0", 4), ("axis", 1)))
    re = g.add("Slice", [c, starts, ends, axes], "re")
    im = g.add("Slice", [c, ends, g.const("e1", [8], np.int64), axes], "im")
    power = g.add("Add", [g.add("Mul", [re, re], "re2"), g.add("Mul", [im, im], "im2")], "power")
    h = g.add("Relu", [g.conv(power, "enc", 4, 3)], "relu")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [h], "gap")], "flat"), g.w("fc.w", 2, 3)], "fc", "y", transB=1)
    model = g.model(["N", 2, 4, 4], "y", ["N", 2])
    groups = find_units(model).by_name()
    assert [g.name for g in find_units(model).groups] == ["stft[0]", "enc"]
    assert {(c.tensor, c.offset) for c in groups["stft[0]"].cuts if c.tensor == "stft.w"} == {("stft.w", 0), ("stft.w", 4)}
    shrinks_to_masked(model, "stft[0]")


# ------------------------------------------------------------------ constants joined along another axis
def test_a_class_token_concatenated_along_the_sequence_is_cut_with_the_units():
    """ViT: patches (Conv, Reshape, Transpose) and an expanded class token along the sequence, plus positions."""
    g = Graph()
    patches = g.add("Reshape", [g.add("Conv", ["x", g.w("patch.w", 4, 1, 2, 2), g.w("patch.b", 4)], "patch", kernel_shape=[2, 2],
                                      strides=[2, 2]), g.const("to_seq", [0, 4, -1], np.int64)], "seq")
    tokens = g.add("Transpose", [patches], "tokens", perm=[0, 2, 1])
    batch = g.add("Gather", [g.add("Shape", ["x"], "shape"), g.const("zero", [0], np.int64)], "batch", axis=0)
    cls = g.add("Expand", [g.w("cls", 1, 1, 4), g.add("Concat", [batch, g.const("one_four", [1, 4], np.int64)], "cls_shape",
                                                     axis=0)], "cls_tokens")
    x = g.add("Add", [g.add("Concat", [cls, tokens], "cat", axis=1), g.w("pos", 1, 5, 4)], "embedded")
    g.add("Add", [g.add("MatMul", [x, g.w("W", 4, 3)], "head"), g.w("b", 3)], "head.bias", "y")
    model = g.model(["N", 1, 4, 4], "y", ["N", 5, 3])
    group = find_units(model).by_name()["patch"]
    assert [c.layer for c in group.consumers] == ["head"] and {"cls", "pos"} <= {c.tensor for c in group.cuts}
    shrinks_to_masked(model, "patch")


# ------------------------------------------------------------------ what cannot go, and why
def test_an_rms_norm_written_out_is_named_as_the_unavoidable_reason():
    g = Graph()
    h = g.add("Add", [g.add("MatMul", ["x", g.w("W0", 4, 6)], "fc0"), g.w("b0", 6)], "fc0.bias")
    mean = g.add("ReduceMean", [g.add("Pow", [h, g.constant_node(2.0)], "sq"), g.const("last", [-1], np.int64)], "mean")
    norm = g.add("Div", [h, g.add("Sqrt", [g.add("Add", [mean, g.constant_node(1e-6)], "eps")], "rms")], "norm")
    g.add("MatMul", [g.add("Mul", [norm, g.w("scale", 6)], "scaled"), g.w("W1", 6, 3)], "fc1", "y")
    why = reasons(g.model(["N", 2, 4], "y", ["N", 2, 3], opset=18))["fc0"]
    assert why.unavoidable and why.reason.startswith("the residual stream of ReduceMean 'mean'")


def test_a_depthwise_conv_of_a_normalized_stream_names_the_normalization():
    """ConvNeXt: a depthwise Conv reads channels a LayerNormalization over them wrote; no group passes
    through it, and the reason it cannot be pruned is the normalization's, not its own shape."""
    g = Graph()
    stem = g.add("Transpose", [g.conv("x", "stem", 3, 6)], "to_last", perm=[0, 2, 3, 1])
    normed = g.add("LayerNormalization", [stem, g.const("ln.w", np.ones(6)), g.const("ln.b", np.zeros(6))], "ln", axis=-1)
    stream = g.add("Transpose", [normed], "to_first", perm=[0, 3, 1, 2])
    g.conv(g.conv(stream, "dw", 6, 6, k=3, pads=1, group=6), "pw", 6, 4)
    found = reasons(g.model(["N", 3, 5, 5], "pw", ["N", 4, 5, 5]))
    assert found["stem"].unavoidable and "LayerNormalization 'ln'" in found["stem"].reason
    why = found["dw"]
    assert why.unavoidable and why.reason.startswith("depthwise Conv 'dw': its channels are those of its input, which "
                                                     "cannot go (Conv 'stem': the residual stream of LayerNormalization")


def test_units_that_reach_the_output_are_unavoidable():
    why = reasons(cnn_with(silu))["fc"]
    assert why.unavoidable and why.reason == "its units reach the graph output 'y'"


# ------------------------------------------------------------------ a padded Conv whose input size is known at run time only
def test_constants_fold_into_a_padded_conv_of_any_input_size():
    g = Graph()
    a = g.add("Relu", [g.conv("x", "conv0", 2, 4)], "relu0")
    b = g.add("Relu", [g.conv(a, "conv1", 4, 3, k=3, pads=1)], "relu1")
    g.add("Gemm", [g.add("Flatten", [g.add("GlobalAveragePool", [b], "gap")], "flat"), g.w("fc.w", 2, 3)], "fc", "y", transB=1)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])]
    model = g.model(None, "y", ["N", 2], inputs=inputs)
    shrunk = shrinks_to_masked(model, "conv0", inputs=[feeds(model, {"H": 5, "W": 7}), feeds(model, {"H": 3, "W": 4})])
    again = shrinks_to_masked(shrunk, "conv0", inputs=[feeds(shrunk, {"H": 6, "W": 6})])  # a second fold adds to the map
    assert find_units(again).by_name()["conv1"]  # and the Conv's own channels can still go
    shrinks_to_masked(again, "conv1", inputs=[feeds(again, {"H": 4, "W": 5})])


@pytest.mark.parametrize("build", [c2f, inverted_residual, lambda: se_model("gemm"), lambda: se_model("paddle"),
                                   lambda: cnn_with(gelu_erf_shared)])
def test_every_group_at_once(build):
    all_at_once(build())


def _two_blocks_sharing_a_computed_shape(width=4, hidden=6, seed=0):
    """Two FFN blocks on (N, S, W) whose hidden Reshape back to (N, S, hidden) reads one shape computed
    once (Concat of the input's batch and sequence sizes and the constant hidden width), as the dynamo
    exporter writes GPT-2: the constant counts both blocks' units."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([hidden], np.int64), "hidden"),
             numpy_helper.from_array(np.array([-1, width], np.int64), "rows")]
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["x.shape"], name="shape"), n("Slice", ["x.shape", "zero", "two"], ["ns"], name="ns"),
             n("Concat", ["ns", "hidden"], ["view"], name="view", axis=0)]
    stream = "x"
    for k in range(2):
        inits += [numpy_helper.from_array(rng.normal(size=(hidden, width)).astype(np.float32), f"W1_{k}"),
                  numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), f"b1_{k}"),
                  numpy_helper.from_array(rng.normal(size=(hidden, width)).astype(np.float32), f"W2_{k}")]
        nodes += [n("Reshape", [stream, "rows"], [f"flat{k}"], name=f"flat{k}"),
                  n("Gemm", [f"flat{k}", f"W1_{k}", f"b1_{k}"], [f"a{k}"], name=f"fc{k}", transB=1),
                  n("Relu", [f"a{k}"], [f"h{k}"], name=f"relu{k}"),
                  n("Reshape", [f"h{k}", "view"], [f"v{k}"], name=f"unflat{k}"),
                  n("MatMul", [f"v{k}", f"W2_{k}"], [f"o{k}"], name=f"proj{k}"),
                  n("Add", [f"o{k}", stream], [f"s{k}"], name=f"res{k}")]
        stream = f"s{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", width])],
                              [helper.make_tensor_value_info(stream, TensorProto.FLOAT, ["N", "S", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_blocks_whose_reshapes_share_one_computed_shape_each_shrink_to_the_masked_model():
    """Each block's units are cut where its own Reshape reads the shared shape (the constant inside the
    Concat counts both blocks' units: editing it would narrow the other block too)."""
    model = _two_blocks_sharing_a_computed_shape()
    assert {g.name for g in find_units(model).groups} == {"fc0", "fc1"}
    all_at_once(model)


def test_a_block_cut_where_it_reads_a_shared_shape_is_found_again_for_the_next_step():
    """The cut block's Reshape gets a shape of its own that writes the kept width (not -1): shape inference
    still tells its hidden axis, so a later step finds the block again and shrinks it further, equal to
    the masked model of the once-shrunk one."""
    from unitref import removal

    from onnxprune.edit.slicing import remove_units
    from onnxprune.find.constants import static_shapes

    model = _two_blocks_sharing_a_computed_shape()
    rng = np.random.default_rng(0)
    group = find_units(model).by_name()["fc0"]
    gone = removal(group, rng)
    shrunk = remove_units(model, {"fc0": gone}, {"fc0": rng.normal(size=group.units)})
    assert static_shapes(shrunk)["v0"][-1] == group.units - len(gone)
    assert static_shapes(shrunk)["v1"][-1] == group.units  # the other block reads the shared shape as before
    again = find_units(shrunk).by_name()
    assert again["fc0"].units == group.units - len(gone) and again["fc1"].units == group.units
    shrinks_to_masked(shrunk, "fc0")
