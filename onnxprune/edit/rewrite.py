"""Apply masks and bias compensations to a copy of the model.

Pruned weights are set to zero (to the zero point behind a DequantizeLinear) and each row's
compensation, the sum over its pruned weights of Delta a_ij, is added to the bias (divided by Gemm's
beta, multiplied by a following BatchNormalization's scale when its bias carries it, rounded for an
integer bias). Initializers keep their names, dtypes and shapes (a scalar bias becomes one value per
output); a layer without a bias gets one (a new initializer: Gemm's C, Conv's B, or an Add node
after a MatMul).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.find.layers import Layer
from onnxprune.graph.index import default_opset


@dataclass
class LayerChange:
    """What the rewrite did to one layer."""

    layer: str
    weights: int
    pruned: int
    sparsity: float          # zeros / weights after the rewrite
    max_bias_shift: float    # largest |change| of the stored bias
    bias_inserted: bool
    dense_bias: float = 0.0  # largest |stored bias| of the dense model's layer (0: none)
    max_bias: float = 0.0    # largest |stored bias| written

    @property
    def relative_bias_shift(self) -> float | None:
        """The largest shift as a multiple of the dense bias's largest entry (None without a dense bias)."""
        return self.max_bias_shift / self.dense_bias if self.dense_bias > 0 else None


def rewrite(model: onnx.ModelProto, layers: list[Layer], masks: dict[str, np.ndarray],
            shifts: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[LayerChange]]:
    """A pruned copy of ``model``: masks (out, in) True = prune; shifts (out, in) pre-activation
    compensation per removed weight, or None for no compensation."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    inits = {t.name: t for t in new.graph.initializer}
    nodes = {n.name: n for n in new.graph.node}
    changes = []
    for layer in layers:
        mask = masks[layer.name]
        stored = inits[layer.weight]
        weight = layer.prune_stored(numpy_helper.to_array(stored), mask)
        stored.CopyFrom(numpy_helper.from_array(weight, layer.weight))
        before = largest_bias(new, layer)
        shift = np.zeros(layer.out_features)
        if shifts is not None and mask.any():
            shift = layer.bias_shift_to_stored(np.where(mask, shifts[layer.name], 0.0).sum(1))
        inserted = shift_bias(new, layer, shift, weight.dtype, inits, nodes)
        changes.append(LayerChange(
            layer=layer.name, weights=layer.size, pruned=int(mask.sum()),
            sparsity=float(np.count_nonzero(layer.to_rows(weight) == 0) / weight.size),
            max_bias_shift=float(np.abs(shift).max()) if shift.size else 0.0, bias_inserted=inserted,
            dense_bias=before, max_bias=float(np.abs(shift).max(initial=0.0)) if inserted else largest_bias(new, layer)))
    return new, changes


def largest_bias(model: onnx.ModelProto, layer: Layer) -> float:
    """The largest |entry| of the layer's stored bias (0 without one): what a float16 copy must hold."""
    if layer.bias is None:
        return 0.0
    init = next((t for t in model.graph.initializer if t.name == layer.bias), None)
    return float(np.abs(numpy_helper.to_array(init).astype(np.float64)).max(initial=0.0)) if init is not None else 0.0


def shift_bias(model: onnx.ModelProto, layer: Layer, shift: np.ndarray, weight_dtype, inits=None, nodes=None) -> bool:
    """Add ``shift`` (stored units, one per output) to the layer's bias, inserting a zero bias first
    when it has none; returns whether one was inserted. ``inits``/``nodes``: name maps to reuse."""
    if not np.any(shift != 0):
        return False
    inits = inits if inits is not None else {t.name: t for t in model.graph.initializer}
    inserted = layer.bias is None
    if inserted:
        nodes = nodes if nodes is not None else {n.name: n for n in model.graph.node}
        dtype = weight_dtype if np.dtype(weight_dtype).kind == "f" else np.float32
        bias_name = _insert_bias(model, nodes[layer.node], layer, dtype)
        inits[bias_name] = model.graph.initializer[-1]
    else:
        assert layer.bias is not None  # not inserted: the layer has its own bias
        bias_name = layer.bias
    _add_to_bias(inits[bias_name], shift, layer.bias_shape)
    return inserted


def ensure_bias(model: onnx.ModelProto, layer: Layer) -> bool:
    """Give a layer without a bias a zero one (in place), as ``shift_bias`` would; whether it did."""
    if layer.bias is not None:
        return False
    dtype = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight)).dtype
    _insert_bias(model, next(n for n in model.graph.node if n.name == layer.node), layer,
                 dtype if np.dtype(dtype).kind == "f" else np.float32)
    return True


def _add_to_bias(init: onnx.TensorProto, shift: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    """Add ``shift`` (one value per output, in stored units) to a bias of ``shape`` (a scalar bias is
    expanded to it); an integer (quantized) bias gets the rounded shift."""
    bias = numpy_helper.to_array(init)
    shape = tuple(shape) if shape is not None else (bias.shape if bias.size == shift.size else shift.shape)
    updated = bias.astype(np.float64).reshape(-1) + shift  # a scalar bias broadcasts into a vector
    if bias.dtype.kind in "iu":
        info = np.iinfo(bias.dtype)
        updated = np.clip(np.round(updated), info.min, info.max)
    init.CopyFrom(numpy_helper.from_array(updated.reshape(shape).astype(bias.dtype), init.name))


def _unique(model: onnx.ModelProto, base: str) -> str:
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {i.name for i in model.graph.input}
    name = base
    while name in taken:
        name += "_"
    return name


def _insert_bias(model: onnx.ModelProto, node: onnx.NodeProto, layer: Layer, dtype) -> str:
    """Give a bias-less layer a zero bias and return its name."""
    name = _unique(model, f"{layer.weight}__bias")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(layer.out_features, dtype), name))
    if model.ir_version < 4:  # before IR 4 every initializer is also a graph input
        model.graph.input.append(helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [layer.out_features]))
    if layer.op in ("Gemm", "Conv"):
        if layer.op == "Gemm":  # the new C enters with beta = 1, as Layer assumes for bias-less Gemms
            keep = [a for a in node.attribute if a.name not in ("beta", "broadcast")]
            opset = default_opset(model, 13)
            if opset < 7:  # Gemm-6 broadcasts C only when told
                keep.append(helper.make_attribute("broadcast", 1))
            del node.attribute[:]
            node.attribute.extend(keep)
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        return name
    raw = _unique(model, f"{node.output[0]}__unbiased")
    out = node.output[0]
    node.output[0] = raw
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index + 1, helper.make_node("Add", [raw, name], [out], name=_unique(model, f"{node.name}__bias_add")))
    return name
