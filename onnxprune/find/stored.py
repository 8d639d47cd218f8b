"""How a layer's weight and bias are reached from their initializers.

A weight may sit behind Identity, Cast, Transpose or DequantizeLinear nodes (then "pruned" means the
quantized value is set to its zero point). A bias is one value per output, stored in any shape that
broadcasts so; a BatchNormalization right after a bias-less layer holds its bias (shifts are
multiplied by scale / sqrt(var + eps), the same function).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.graph.index import FLOAT_TYPES, GraphIndex, Rejection, attributes, fail

QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
               onnx.TensorProto.INT32}
WEIGHT_PATH_OPS = ("Identity", "Cast", "Transpose", "DequantizeLinear")


@dataclass(frozen=True)
class WeightStep:
    """One node between a weight's initializer and the layer: Identity, Cast, Transpose or
    DequantizeLinear (per-tensor or per-axis; scale and zero point flattened)."""

    op: str
    node: str
    perm: tuple[int, ...] | None = None
    scale: tuple[float, ...] = ()
    zero_point: tuple[float, ...] = ()
    axis: int = 1

    def _broadcast(self, values: tuple[float, ...], ndim: int) -> np.ndarray:
        a = np.asarray(values, np.float64)
        if a.size == 1:
            return a.reshape(())
        shape = [1] * ndim
        shape[self.axis % ndim] = a.size
        return a.reshape(shape)

    def forward(self, a: np.ndarray) -> np.ndarray:
        if self.op == "Transpose":
            return np.transpose(a, self.perm)
        if self.op == "DequantizeLinear":
            return (a.astype(np.float64) - self._broadcast(self.zero_point, a.ndim)) * self._broadcast(self.scale, a.ndim)
        return a

    def backward(self, a: np.ndarray) -> np.ndarray:
        """The layout inverse of forward (values are not de-scaled): for masks and positions."""
        if self.op == "Transpose":
            return np.transpose(a, np.argsort(self.perm or ()))
        return a

    def stored_zero(self, shape: tuple[int, ...]) -> np.ndarray:
        """What 'zero' is in the stored tensor of this step's input (the zero point for DequantizeLinear)."""
        if self.op == "DequantizeLinear":
            return np.broadcast_to(self._broadcast(self.zero_point, len(shape)), shape)
        return np.zeros(shape)


@dataclass(frozen=True)
class StoredWeight:
    """Where a node's weight input comes from: its initializer, the steps to the node, the shape the node sees."""

    init: str
    steps: tuple[WeightStep, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredBias:
    """A per-output bias: its initializer, the shape it is stored in, whether it is quantized, and the
    factor from a pre-activation shift to a stored shift (per output)."""

    init: str
    shape: tuple[int, ...]
    quantized: bool
    factor: np.ndarray
    node: str | None = None       # the node holding it when it is not the layer's own (Add, BatchNormalization)
    output: str | None = None     # that node's output when it is an Add after the layer: the pre-activation


def _path_step(g: GraphIndex, node: onnx.NodeProto, name: str, what: str, steps: list[WeightStep]) -> WeightStep | Rejection:
    attrs = attributes(node)
    if node.op_type == "Transpose":
        return WeightStep("Transpose", node.name, perm=tuple(int(p) for p in attrs["perm"]) if "perm" in attrs else None)
    if node.op_type == "Cast":
        if attrs.get("to") not in FLOAT_TYPES:
            return fail(f"{what} {name!r} is cast to a non-float type by {node.name!r}")
        return WeightStep("Cast", node.name)
    if node.op_type == "DequantizeLinear":
        if any(s.op == "DequantizeLinear" for s in steps):
            return fail(f"{what} {name!r} is dequantized twice")
        if attrs.get("block_size", 0):
            return fail(f"{what} {name!r} uses blocked quantization (DequantizeLinear block_size), which is not supported")
        scale = g.constant(node.input[1])
        zero = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        if scale is None or zero is None:
            return fail(f"{what} {name!r}: DequantizeLinear {node.name!r} has a scale or zero point that is not an initializer")
        if node.input[0] not in g.inits:
            return fail(f"{what} {name!r}: DequantizeLinear {node.name!r} does not read an initializer")
        return WeightStep("DequantizeLinear", node.name, scale=tuple(map(float, scale.ravel())),
                          zero_point=tuple(map(float, zero.ravel())), axis=int(attrs.get("axis", 1)))
    return WeightStep("Identity", node.name)


def weight_path(g: GraphIndex, name: str, what: str = "weight") -> tuple[str, tuple[WeightStep, ...]] | Rejection:
    """Follow ``name`` back to its initializer through Identity/Cast/Transpose/DequantizeLinear."""
    steps: list[WeightStep] = []
    current = name
    while current not in g.inits:
        node = g.producers.get(current)
        if node is None:
            return fail(f"{what} {name!r} is a graph input, not an initializer")
        if node.op_type not in WEIGHT_PATH_OPS:
            return fail(f"{what} {name!r} is produced by {node.op_type} {node.name!r}, not an initializer")
        if g.users(current) > 1:
            return fail(g.shared_reason(current, what))
        step = _path_step(g, node, name, what, steps)
        if isinstance(step, Rejection):
            return step
        steps.insert(0, step)
        current = node.input[0]
    if g.users(current) > 1:
        return fail(g.shared_reason(current, what))
    dtype = g.inits[current].data_type
    if steps and steps[0].op == "DequantizeLinear":
        if dtype not in QUANT_TYPES:
            return fail(f"{what} {current!r} has dtype {onnx.helper.tensor_dtype_to_np_dtype(dtype)}, "
                        "not a supported quantized type")
    elif dtype not in FLOAT_TYPES:
        return fail(f"{what} {name!r} has dtype {onnx.helper.tensor_dtype_to_np_dtype(dtype)}, not float")
    if any(s.op == "DequantizeLinear" for s in steps[1:]):
        return fail(f"{what} {name!r}: DequantizeLinear after another node is not supported")
    return current, tuple(steps)


def node_weight(g: GraphIndex, name: str, rank: int | None = None) -> StoredWeight | Rejection:
    """A node's weight input: its initializer, the steps to the node (default Transposes given an
    explicit perm) and the shape the node sees, or why it is not a prunable weight."""
    resolved = weight_path(g, name)
    if isinstance(resolved, Rejection):
        return resolved
    init, steps = resolved
    stored_rank = len(g.inits[init].dims)
    steps = tuple(WeightStep(s.op, s.node, tuple(reversed(range(stored_rank))), s.scale, s.zero_point, s.axis)
                  if s.op == "Transpose" and s.perm is None else s for s in steps)
    shape = tuple(int(d) for d in g.inits[init].dims)
    for step in steps:
        if step.op == "Transpose" and step.perm is not None:
            shape = tuple(shape[p] for p in step.perm)
    if rank is not None and len(shape) != rank:
        return fail(f"weight {name!r} has shape {list(shape)}, not {rank}-D")
    return StoredWeight(init, steps, shape)


def bias_target_shape(dims: tuple[int, ...], out: int, axis_from_end: int) -> tuple[int, ...] | None:
    """The stored shape of a bias that adds one value per output channel (the channel axis being
    ``axis_from_end`` from the right of the pre-activation); None if it is not such a bias."""
    dims = tuple(int(d) for d in dims)
    for i, d in enumerate(reversed(dims), start=1):
        if d != 1 and not (i == axis_from_end and d == out):
            return None
    target = [1] * max(len(dims), axis_from_end)
    target[-axis_from_end] = out
    return tuple(target)


def bias(g: GraphIndex, name: str, out: int, axis_from_end: int, what: str = "bias") -> StoredBias | Rejection:
    """A per-output bias stored in ``name``, or why it is not one."""
    resolved = weight_path(g, name, what)
    if isinstance(resolved, Rejection):
        return resolved
    init, steps = resolved
    if any(s.op == "Transpose" for s in steps):
        return fail(f"{what} {name!r} is transposed")
    dims = tuple(int(d) for d in g.inits[init].dims)
    target = bias_target_shape(dims, out, axis_from_end)
    if target is None:
        return fail(f"{what} {name!r} has shape {list(dims)}, not one value per output")
    factor = np.ones(out)
    quantized = bool(steps and steps[0].op == "DequantizeLinear")
    if quantized:
        scale = np.asarray(steps[0].scale)
        if scale.size not in (1, out):
            return fail(f"{what} {name!r}: its DequantizeLinear scale has {scale.size} values for {out} outputs")
        factor = 1.0 / np.broadcast_to(scale, (out,))
        target = dims if int(np.prod(dims)) == out else target
    return StoredBias(init, target, quantized, factor)


def batchnorm_bias(g: GraphIndex, preact: str, out: int) -> StoredBias | None:
    """The bias of an inference-mode BatchNormalization with constant parameters that is the only
    user of ``preact`` (channel axis = the layer's output axis), as a bias of the layer."""
    bn = g.sole_user(preact, "BatchNormalization")
    if bn is None or bn.input[0] != preact:
        return None
    attrs = attributes(bn)
    if attrs.get("training_mode", 0) or not attrs.get("spatial", 1) or sum(1 for o in bn.output if o) > 1:
        return None
    values = [g.constant(name) for name in bn.input[1:5]]
    if any(v is None or v.shape != (out,) for v in values) or g.users(bn.input[2]) > 1:
        return None
    scale, _, _, var = (np.asarray(v, np.float64) for v in values)
    factors = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return StoredBias(bn.input[2], (out,), False, factors, node=bn.name)
