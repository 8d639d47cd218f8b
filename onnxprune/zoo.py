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
        nodes.append(helper.make_node("Gemm", [current, f"fc{layer}.weight", f"fc{layer}.bias"], [out], name=f"fc{layer}", transB=1))
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


def parse_widths(text: str) -> tuple[int, ...]:
    """Hidden layer widths from text like "64,64" (an InputError, one line, for anything else)."""
    from .errors import InputError

    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise InputError(f"expected comma-separated layer widths like 64,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise InputError(f"layer widths must be positive, got {text!r}")
    return widths


def widths_argument(text: str) -> tuple[int, ...]:
    """``parse_widths`` as an argparse ``type`` (the scripts' --hidden)."""
    import argparse

    from .errors import InputError

    try:
        return parse_widths(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
