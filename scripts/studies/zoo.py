"""ONNX builders for the paper's networks, initialised like PyTorch so results are comparable.

``build_mlp`` makes the fully connected classifiers of the MNIST studies: Gemm layers (transB=1,
weights stored (out, in) as nn.Linear does) named fc1, fc2, ... with an activation after every
hidden layer. Weights and biases are uniform in ±1/sqrt(fan_in) (nn.Linear's default); a PReLU has
one shared slope per layer initialised at 0.25 (nn.PReLU()).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
ACTIVATIONS = ("prelu", "relu")


def build_mlp(
    hidden: Sequence[int] = (64, 64),
    seed: int = 0,
    activation: str = "prelu",
    inputs: int = 784,
    classes: int = 10,
) -> onnx.ModelProto:
    """An MLP inputs-hidden...-classes from input ``x`` (N, inputs) to ``logits`` (N, classes)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if not hidden or any(int(h) < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive integers, got {tuple(hidden)}")
    rng = np.random.default_rng(seed)
    sizes = [inputs, *map(int, hidden), classes]
    nodes, initializers, current = [], [], "x"
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        bound = 1.0 / np.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32)
        bias = rng.uniform(-bound, bound, size=fan_out).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"fc{layer}.weight"), numpy_helper.from_array(bias, f"fc{layer}.bias")]
        out = "logits" if layer == len(sizes) - 1 else f"fc{layer}.out"
        nodes.append(helper.make_node("Gemm", [current, f"fc{layer}.weight", f"fc{layer}.bias"], [out], name=f"fc{layer}",
                                      transB=1))
        current = out
        if out == "logits":
            continue
        act = f"{activation}{layer}"
        if activation == "prelu":
            initializers.append(numpy_helper.from_array(np.full(1, 0.25, dtype=np.float32), f"{act}.weight"))
        op, args = ("PRelu", [current, f"{act}.weight"]) if activation == "prelu" else ("Relu", [current])
        nodes.append(helper.make_node(op, args, [f"{act}.out"], name=act))
        current = f"{act}.out"
    graph = helper.make_graph(
        nodes,
        "mlp_" + "_".join(map(str, sizes)),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune.zoo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def widths_argument(text: str) -> tuple[int, ...]:
    """``parse_widths`` as an argparse ``type`` (the scripts' --hidden)."""
    import argparse

    from onnxprune.cli.options import parse_widths
    from onnxprune.errors import InputError

    try:
        return parse_widths(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Params:
    """Initializers drawn like PyTorch's defaults (uniform in +-1/sqrt(fan_in)) from one generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tensors: list[onnx.TensorProto] = []

    def uniform(self, name: str, shape: Sequence[int], fan_in: int, gain: float = 1.0) -> str:
        bound = gain / np.sqrt(fan_in)
        self.tensors.append(numpy_helper.from_array(self.rng.uniform(-bound, bound, size=shape).astype(np.float32), name))
        return name

    def constant(self, name: str, value) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def _finish(nodes, params: _Params, name: str, inputs: int, classes: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], params.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune.zoo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_resnet(widths: Sequence[int] = (16, 32), seed: int = 0, side: int = 28, classes: int = 10) -> onnx.ModelProto:
    """A small residual CNN on flat (N, side*side) images: stem Conv 3x3 -> ReLU -> MaxPool 2, then per
    width a stage (a stride-2 Conv 3x3 -> ReLU entering every stage after the first) with one residual
    block s + conv_b(relu(conv_a(s))) -> ReLU, then GlobalAveragePool -> Flatten -> Gemm ``fc``.
    No BatchNormalization (training would leave its running statistics at their start values); the
    Convs' weights are Kaiming-uniform (bound sqrt(6 / fan_in), for ReLU) so that the signal keeps its
    scale without it, their biases and ``fc`` as PyTorch's default."""
    p = _Params(seed)
    make = helper.make_node
    image_shape = p.constant("image_shape", np.array([-1, 1, side, side], np.int64))
    nodes = [make("Reshape", ["x", image_shape], ["image"], name="to_image")]

    def conv(name, source, cin, cout, stride=1):
        nodes.append(make("Conv", [source, p.uniform(f"{name}.weight", (cout, cin, 3, 3), cin * 9, gain=np.sqrt(6)),
                                   p.uniform(f"{name}.bias", (cout,), cin * 9)], [f"{name}.out"], name=name,
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]))
        return f"{name}.out"

    def relu(name, source):
        nodes.append(make("Relu", [source], [f"{name}.out"], name=name))
        return f"{name}.out"

    stream = relu("stem_relu", conv("stem", "image", 1, widths[0]))
    nodes.append(make("MaxPool", [stream], ["pool.out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    stream, width = "pool.out", widths[0]
    for stage, out in enumerate(widths, start=1):
        if stage > 1:
            stream, width = relu(f"down{stage}_relu", conv(f"down{stage}", stream, width, out, stride=2)), out
        inner = relu(f"block{stage}a_relu", conv(f"block{stage}a", stream, width, width))
        branch = conv(f"block{stage}b", inner, width, width)
        nodes.append(make("Add", [stream, branch], [f"add{stage}.out"], name=f"add{stage}"))
        stream = relu(f"block{stage}_relu", f"add{stage}.out")
    nodes += [make("GlobalAveragePool", [stream], ["gap.out"], name="gap"),
              make("Flatten", ["gap.out"], ["flat"], name="flatten"),
              make("Gemm", ["flat", p.uniform("fc.weight", (classes, width), width), p.uniform("fc.bias", (classes,), width)],
                   ["logits"], name="fc", transB=1)]
    return _finish(nodes, p, "mnist_resnet", side * side, classes)


def build_transformer(width: int = 64, heads: int = 4, ffn: int = 128, blocks: int = 2, patch: int = 7, seed: int = 0,
                      side: int = 28, classes: int = 10, activation: str = "relu") -> onnx.ModelProto:
    """A small vision transformer on flat (N, side*side) images: patch x patch patches embedded by a
    MatMul + Add, a learnt position embedding, ``blocks`` pre-norm encoder blocks (LayerNormalization ->
    multi-head self-attention, Q/K/V/O each MatMul + Add, heads split by Reshape (N, S, heads, size) and
    Transpose -> residual Add; LayerNormalization -> FFN MatMul + Add -> ReLU -> MatMul + Add -> residual
    Add), a final LayerNormalization, the mean over the patches and a Gemm ``head``. ``activation="gelu"``
    writes the FFN's GELU as torch's exporter does: x * 0.5 * (1 + erf(x / sqrt 2)) (a ViT)."""
    if width % heads:
        raise ValueError(f"width {width} is not a multiple of heads {heads}")
    p = _Params(seed)
    make = helper.make_node
    grid, size = side // patch, width // heads
    seq, pixels = grid * grid, patch * patch

    def linear(name, source, fan_in, fan_out):
        weight, bias = p.uniform(f"{name}.weight", (fan_in, fan_out), fan_in), p.uniform(f"{name}.bias", (fan_out,), fan_in)
        nodes.append(make("MatMul", [source, weight], [f"{name}.mm"], name=name))
        nodes.append(make("Add", [f"{name}.mm", bias], [f"{name}.out"], name=f"{name}_bias"))
        return f"{name}.out"

    def norm(name, source):
        nodes.append(make("LayerNormalization", [source, p.constant(f"{name}.weight", np.ones(width, np.float32)),
                                                 p.constant(f"{name}.bias", np.zeros(width, np.float32))],
                          [f"{name}.out"], name=name, axis=-1, epsilon=1e-5))
        return f"{name}.out"

    grid_shape = p.constant("grid_shape", np.array([-1, grid, patch, grid, patch], np.int64))
    patch_shape = p.constant("patch_shape", np.array([-1, seq, pixels], np.int64))
    nodes = [make("Reshape", ["x", grid_shape], ["grid"], name="to_grid"),
             make("Transpose", ["grid"], ["patches4"], name="patches", perm=[0, 1, 3, 2, 4]),
             make("Reshape", ["patches4", patch_shape], ["patches"], name="to_patches")]
    embedded = linear("embed", "patches", pixels, width)
    position = p.constant("position", (p.rng.normal(size=(seq, width)) * 0.02).astype(np.float32))
    nodes.append(make("Add", [embedded, position], ["stream0"], name="add_position"))
    stream = "stream0"
    for b in range(1, blocks + 1):
        h = norm(f"block{b}.norm1", stream)
        split = {}
        for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            projected = linear(f"block{b}.{part}", h, width, width)
            shape = p.constant(f"block{b}.{part}_split_shape", np.array([0, 0, heads, size], np.int64))
            nodes += [make("Reshape", [projected, shape], [f"block{b}.{part}_split"], name=f"block{b}.{part}_split"),
                      make("Transpose", [f"block{b}.{part}_split"], [f"block{b}.{part}_heads"], name=f"block{b}.{part}_heads",
                           perm=perm)]
            split[part] = f"block{b}.{part}_heads"
        scale = p.constant(f"block{b}.scale", np.array(1 / np.sqrt(size), np.float32))
        a = f"block{b}.attn"
        nodes += [make("MatMul", [split["q"], split["k"]], [f"{a}.scores"], name=f"{a}.qk"),
                  make("Mul", [f"{a}.scores", scale], [f"{a}.scaled"], name=f"{a}.scale"),
                  make("Softmax", [f"{a}.scaled"], [f"{a}.probs"], name=f"{a}.softmax", axis=-1),
                  make("MatMul", [f"{a}.probs", split["v"]], [f"{a}.context_heads"], name=f"{a}.pv"),
                  make("Transpose", [f"{a}.context_heads"], [f"{a}.context_t"], name=f"{a}.merge_t", perm=[0, 2, 1, 3]),
                  make("Reshape", [f"{a}.context_t", p.constant(f"{a}.merge_shape", np.array([0, 0, width], np.int64))],
                       [f"{a}.context"], name=f"{a}.merge")]
        attended = linear(f"block{b}.o", f"{a}.context", width, width)
        nodes.append(make("Add", [stream, attended], [f"block{b}.mid"], name=f"block{b}.residual1"))
        h = norm(f"block{b}.norm2", f"block{b}.mid")
        up = linear(f"block{b}.ffn1", h, width, ffn)
        if activation == "gelu":
            nodes.extend(_gelu(p, up, f"block{b}.ffn_act"))
        else:
            nodes.append(make("Relu", [up], [f"block{b}.ffn_act"], name=f"block{b}.ffn_relu"))
        down = linear(f"block{b}.ffn2", f"block{b}.ffn_act", ffn, width)
        nodes.append(make("Add", [f"block{b}.mid", down], [f"block{b}.out"], name=f"block{b}.residual2"))
        stream = f"block{b}.out"
    nodes.append(make("ReduceMean", [norm("final_norm", stream)], ["pooled"], name="pool", axes=[1], keepdims=0))
    head = [p.uniform("head.weight", (classes, width), width), p.uniform("head.bias", (classes,), width)]
    nodes.append(make("Gemm", ["pooled", *head], ["logits"], name="head", transB=1))
    return _finish(nodes, p, "mnist_vit" if activation == "gelu" else "mnist_transformer", side * side, classes)


def _gelu(p: _Params, source: str, out: str) -> list[onnx.NodeProto]:
    """GELU as torch's exporter writes it: x * 0.5 * (1 + erf(x / sqrt 2))."""
    make = helper.make_node
    root, one, half = (p.constant(f"{out}.{k}", np.array(v, np.float32)) for k, v in
                       (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5)))
    return [make("Div", [source, root], [f"{out}.scaled"], name=f"{out}.div"),
            make("Erf", [f"{out}.scaled"], [f"{out}.erf"], name=f"{out}.erf"),
            make("Add", [f"{out}.erf", one], [f"{out}.erf1"], name=f"{out}.add"),
            make("Mul", [source, f"{out}.erf1"], [f"{out}.x_erf"], name=f"{out}.mul"),
            make("Mul", [f"{out}.x_erf", half], [out], name=out)]


def _silu(source: str, out: str) -> list[onnx.NodeProto]:
    """SiLU as torch's exporter writes it: x * sigmoid(x)."""
    make = helper.make_node
    return [make("Sigmoid", [source], [f"{out}.sigmoid"], name=f"{out}.sigmoid"),
            make("Mul", [source, f"{out}.sigmoid"], [out], name=out)]


def _hardswish(source: str, out: str) -> list[onnx.NodeProto]:
    """HardSwish as torch's dynamo exporter writes it: x * HardSigmoid(x) (alpha 1/6, beta 1/2)."""
    make = helper.make_node
    return [make("HardSigmoid", [source], [f"{out}.gate"], name=f"{out}.hardsigmoid", alpha=1 / 6, beta=0.5),
            make("Mul", [source, f"{out}.gate"], [out], name=out)]


def _conv(p: _Params, nodes: list, name: str, source: str, cin: int, cout: int, k: int = 3, stride: int = 1,
          groups: int = 1) -> str:
    """A Conv k x k (padded to keep the size), its weights Kaiming-uniform, its bias PyTorch's default."""
    fan_in = cin // groups * k * k
    nodes.append(helper.make_node("Conv", [source, p.uniform(f"{name}.weight", (cout, cin // groups, k, k), fan_in,
                                                            gain=np.sqrt(6)),
                                           p.uniform(f"{name}.bias", (cout,), fan_in)], [f"{name}.out"], name=name,
                                  kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride], group=groups))
    return f"{name}.out"


def build_silu_cnn(widths: Sequence[int] = (16, 32), seed: int = 0, side: int = 28, classes: int = 10) -> onnx.ModelProto:
    """A CNN with SiLU on flat (N, side*side) images: per width a Conv 3x3 -> SiLU -> MaxPool 2, then
    Flatten -> Gemm 64 -> SiLU -> Gemm ``fc2``; SiLU written x * sigmoid(x) as torch exports it."""
    p, nodes = _Params(seed), []
    make = helper.make_node
    nodes.append(make("Reshape", ["x", p.constant("image_shape", np.array([-1, 1, side, side], np.int64))], ["image"],
                      name="to_image"))
    stream, width, size = "image", 1, side
    for k, out in enumerate(widths, start=1):
        nodes.extend(_silu(_conv(p, nodes, f"conv{k}", stream, width, out), f"act{k}"))
        nodes.append(make("MaxPool", [f"act{k}"], [f"pool{k}.out"], name=f"pool{k}", kernel_shape=[2, 2], strides=[2, 2]))
        stream, width, size = f"pool{k}.out", out, size // 2
    features = width * size * size
    nodes.append(make("Flatten", [stream], ["flat"], name="flatten"))
    nodes.append(make("Gemm", ["flat", p.uniform("fc1.weight", (64, features), features), p.uniform("fc1.bias", (64,), features)],
                      ["fc1.out"], name="fc1", transB=1))
    nodes.extend(_silu("fc1.out", "act_fc1"))
    nodes.append(make("Gemm", ["act_fc1", p.uniform("fc2.weight", (classes, 64), 64), p.uniform("fc2.bias", (classes,), 64)],
                      ["logits"], name="fc2", transB=1))
    return _finish(nodes, p, "mnist_silu_cnn", side * side, classes)


def build_mobilenet(seed: int = 0, side: int = 28, classes: int = 10, stem: int = 16,
                    stages: Sequence[tuple[int, int, int]] = ((16, 48, 1), (24, 72, 2), (24, 72, 1))) -> onnx.ModelProto:
    """A MobileNetV3-style net on flat (N, side*side) images: a stride-2 stem Conv 3x3 -> HardSwish, then per
    stage (out, expanded, stride) an inverted residual block: expand Conv 1x1 -> HardSwish -> depthwise Conv
    3x3 -> HardSwish -> squeeze-excitation (GlobalAveragePool -> Conv 1x1 to expanded/4 -> ReLU -> Conv 1x1 ->
    HardSigmoid -> Mul) -> project Conv 1x1, added to its input where the shape allows; then a head Conv 1x1
    96 -> HardSwish -> GlobalAveragePool -> Flatten -> Gemm ``fc``. HardSwish written x * HardSigmoid(x) as
    torch's dynamo exporter does. No BatchNormalization (see build_resnet)."""
    p, nodes = _Params(seed), []
    make = helper.make_node
    nodes.append(make("Reshape", ["x", p.constant("image_shape", np.array([-1, 1, side, side], np.int64))], ["image"],
                      name="to_image"))
    nodes.extend(_hardswish(_conv(p, nodes, "stem", "image", 1, stem, stride=2), "stem_act"))
    stream, width = "stem_act", stem
    for b, (out, expanded, stride) in enumerate(stages, start=1):
        name = f"block{b}"
        nodes.extend(_hardswish(_conv(p, nodes, f"{name}.expand", stream, width, expanded, k=1), f"{name}.expand_act"))
        nodes.extend(_hardswish(_conv(p, nodes, f"{name}.dw", f"{name}.expand_act", expanded, expanded, stride=stride,
                                      groups=expanded), f"{name}.dw_act"))
        squeezed = max(4, expanded // 4)
        nodes.append(make("GlobalAveragePool", [f"{name}.dw_act"], [f"{name}.se_pool"], name=f"{name}.se_pool"))
        nodes.append(make("Relu", [_conv(p, nodes, f"{name}.se1", f"{name}.se_pool", expanded, squeezed, k=1)],
                          [f"{name}.se_relu"], name=f"{name}.se_relu"))
        nodes.append(make("HardSigmoid", [_conv(p, nodes, f"{name}.se2", f"{name}.se_relu", squeezed, expanded, k=1)],
                          [f"{name}.gate"], name=f"{name}.gate", alpha=1 / 6, beta=0.5))
        nodes.append(make("Mul", [f"{name}.dw_act", f"{name}.gate"], [f"{name}.excited"], name=f"{name}.excite"))
        projected = _conv(p, nodes, f"{name}.project", f"{name}.excited", expanded, out, k=1)
        if stride == 1 and out == width:
            nodes.append(make("Add", [stream, projected], [f"{name}.out"], name=f"{name}.residual"))
            projected = f"{name}.out"
        stream, width = projected, out
    nodes.extend(_hardswish(_conv(p, nodes, "head", stream, width, 96, k=1), "head_act"))
    nodes += [make("GlobalAveragePool", ["head_act"], ["gap.out"], name="gap"),
              make("Flatten", ["gap.out"], ["flat"], name="flatten"),
              make("Gemm", ["flat", p.uniform("fc.weight", (classes, 96), 96), p.uniform("fc.bias", (classes,), 96)], ["logits"],
                   name="fc", transB=1)]
    return _finish(nodes, p, "mnist_mobilenet", side * side, classes)


def build_vit(seed: int = 0, **kwargs) -> onnx.ModelProto:
    """``build_transformer`` with GELU in its FFN: a small ViT."""
    return build_transformer(seed=seed, activation="gelu", **kwargs)
