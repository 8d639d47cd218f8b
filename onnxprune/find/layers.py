"""Find the prunable layers of a graph, and say why the others cannot be pruned.

A layer computes a pre-activation ``a = W_eff z + b_eff`` with a constant weight. ``Layer`` records
where W and b live in the graph and how they map to the (out, in) view the statistics use:

- Gemm ``Y = alpha A B' + beta C`` (transB 0/1, any alpha/beta, C per output or scalar);
- MatMul ``z @ W`` followed by an Add of a per-output bias on either side; on 2-D inputs a "dense"
  layer, on inputs of rank >= 3 (batch x sequence x features) a "sequence" layer whose weight is
  shared by every position;
- a Gemm or a 2-D MatMul whose input a Reshape folded from rank >= 3 ((batch, sequence, features) ->
  (batch x sequence, features), GPT-2's Conv1D on every exporter) is a "folded" layer: its rows are
  positions, sample by sample (sample-major, as the Reshape lays them out), so it is summed like a
  "sequence" layer once the rows are grouped back by sample (``sample_major``; ``check.validate``
  measures that the rows do group so);
- Conv (1-D, 2-D, 3-D; groups, depthwise, strides, pads, auto_pad, dilations) with its bias input or
  a separate Add of a (1, C, 1, 1)-shaped constant; row i of the (out, in) view is
  ``W[i].reshape(-1)`` (in = C/groups * prod(kernel)).

How the weight and bias are reached from their initializers is ``onnxprune.find.stored``. A layer
without a bias gets one when compensation needs it, except when an inference-mode
BatchNormalization follows it: then the shift goes to the BatchNormalization's bias, which is the
same function. Statistics are taken at the layer's own output (the tensor the bias shift acts on)
and the gradient flows through the BatchNormalization like through any other node.

One matcher per pattern (``match_gemm``, ``match_matmul``, ``match_conv``): each returns a
``Layer`` or a ``Rejection`` with the reason ``inspect`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.find.constants import Constants, kept_last_axis
from onnxprune.find.geometry import ConvGeometry, conv_geometry
from onnxprune.find.stored import StoredBias, WeightStep, batchnorm_bias, bias, node_weight, weight_path
from onnxprune.graph.index import GraphIndex, Rejection, attributes, fail, name_nodes, read_initializer

KINDS = ("dense", "sequence", "folded", "conv")
BORDER = "__onnxprune_border"  # the Add that holds a padded Conv's folded border (edit.slicing)
BORDER_CONV = "__conv"          # its Conv of an all-ones image when the map is computed at run time: not a layer


@dataclass(frozen=True)
class Layer:
    """One prunable linear layer, in graph order."""

    name: str            # node name (or the weight's name when the node has none)
    op: str              # "Gemm", "MatMul" or "Conv"
    node: str            # name of the Gemm / MatMul / Conv node (unique after analyse_graph)
    weight: str          # the weight's initializer (what is pruned)
    bias: str | None     # bias initializer; None when the layer has none (a zero bias is inserted)
    input: str           # tensor z the weight multiplies
    preact: str          # tensor a = W z + b (node output, or the bias Add's output)
    out_features: int
    in_features: int
    transposed: bool     # the node's weight is (in, out) rather than (out, in)
    alpha: float = 1.0
    beta: float = 1.0
    bias_node: str | None = None  # the node holding the bias when it is not the layer's node (Add, BatchNormalization)
    kind: str = "dense"  # "dense" (one position per sample), "sequence" (MatMul on rank >= 3), "folded", "conv"
    conv: ConvGeometry | None = None
    weight_path: tuple[WeightStep, ...] = ()   # from the initializer to the node's weight input
    weight_shape: tuple[int, ...] = ()         # the weight as the node sees it
    bias_factors: tuple[float, ...] | None = None  # stored bias shift = pre-activation shift * factor (per row)
    bias_shape: tuple[int, ...] | None = None      # shape the stored bias takes (a scalar bias is expanded)
    bias_quantized: bool = False                   # integer bias behind DequantizeLinear: shifts are rounded
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.out_features * self.in_features

    @property
    def geometry(self) -> ConvGeometry:
        """The Conv geometry (every Conv layer has one; an error for any other layer)."""
        if self.conv is None:
            raise ValueError(f"layer {self.name!r} ({self.op}) has no Conv geometry")
        return self.conv

    @property
    def shared(self) -> bool:
        """Whether the weight is applied at several positions per sample (Conv, sequence MatMul, folded rows)."""
        return self.kind != "dense"

    def node_weight(self, stored: np.ndarray) -> np.ndarray:
        """Stored initializer -> the weight as the layer's node sees it (float64)."""
        w = np.asarray(stored)
        for step in self.weight_path:
            w = step.forward(w)
        return np.asarray(w, dtype=np.float64)

    def to_rows(self, stored: np.ndarray) -> np.ndarray:
        """Stored weight -> effective (out, in) matrix as it acts on the pre-activation (float64)."""
        w = self.node_weight(stored)
        if self.op == "Conv":
            return w.reshape(self.out_features, -1)
        return self.alpha * (w.T if self.transposed else w)

    def mask_to_stored(self, rows: np.ndarray) -> np.ndarray:
        """An (out, in) array (mask or values) laid out like the stored initializer (no re-scaling)."""
        a = rows.reshape(self.weight_shape) if self.op == "Conv" else (rows.T if self.transposed else rows)
        for step in reversed(self.weight_path):
            a = step.backward(a)
        return a

    def prune_stored(self, stored: np.ndarray, rows_mask: np.ndarray) -> np.ndarray:
        """A copy of the stored weight with the masked entries zeroed (set to the zero point when quantized)."""
        out = np.array(stored, copy=True)
        mask = self.mask_to_stored(rows_mask)
        if self.weight_path and self.weight_path[0].op == "DequantizeLinear":
            out[mask] = self.weight_path[0].stored_zero(out.shape)[mask].astype(out.dtype)
        else:
            out[mask] = 0
        return out

    def bias_shift_to_stored(self, shift_rows: np.ndarray) -> np.ndarray:
        """A shift of the pre-activation -> the shift of the stored bias (Gemm divides by beta, a
        BatchNormalization bias multiplies by its scale, a quantized bias divides by its scale)."""
        if self.bias_factors is not None:
            return shift_rows * np.asarray(self.bias_factors)
        return shift_rows / self.beta


@dataclass(frozen=True)
class Skipped:
    """What is not pruned -- a layer, or the units of a layer's output -- and why (``inspect``, ``-v``
    and the JSON show the reason as it is); ``unavoidable`` when no rewrite could prune it (the units
    are what the model returns, or a normalization over the channels mixes them)."""

    node: str
    op: str
    reason: str
    unavoidable: bool = False


@dataclass
class GraphLayers:
    layers: list[Layer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}


def effective_weights(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, np.ndarray]:
    """Each layer's effective (out, in) weight matrix, float64, by layer name."""
    return {layer.name: layer.to_rows(read_initializer(model, layer.weight)) for layer in layers}


LINEAR_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "Einsum", "QLinearMatMul", "MatMulInteger", "QLinearConv",
              "ConvInteger", "DeformConv")


def analyse_graph(model: onnx.ModelProto) -> GraphLayers:
    """The prunable layers of ``model`` (names its unnamed nodes in place) and the skipped ones."""
    name_nodes(model)
    g = GraphIndex(model)
    found = GraphLayers()
    for node in model.graph.node:
        matcher = MATCHERS.get(node.op_type)
        if node.name.endswith(BORDER + BORDER_CONV):
            continue
        if matcher is not None:
            result = matcher(g, node)
        elif node.op_type in LINEAR_OPS:
            result = fail(f"{node.op_type} layers are not supported")
        else:
            continue
        if not isinstance(result, Rejection) and not (result.out_features and result.in_features):
            result = fail(f"its weight {result.weight!r} has no elements (shape {result.out_features} x "
                          f"{result.in_features})")
        if isinstance(result, Rejection):
            found.skipped.append(Skipped(node.name, node.op_type, result.reason))
        else:
            found.layers.append(result)
    return found


def _bias_fields(g: GraphIndex, preact: str, out: int, stored: StoredBias | None, beta: float,
                 batchnorm_axis: bool) -> dict:
    """The Layer fields saying where the bias is: ``stored``, else the bias of a BatchNormalization
    right after the layer (when it normalizes the layer's output axis), else a new bias (Gemm's C,
    Conv's B or an Add after a MatMul)."""
    if stored is not None:
        return dict(bias=stored.init, bias_node=stored.node, bias_shape=stored.shape, bias_quantized=stored.quantized,
                    bias_factors=tuple(stored.factor / beta) if stored.quantized else None, beta=beta)
    bn = batchnorm_bias(g, preact, out) if batchnorm_axis else None
    if bn is not None:
        return dict(bias=bn.init, bias_node=bn.node, bias_shape=bn.shape, bias_factors=tuple(bn.factor), beta=1.0)
    return dict(bias=None, bias_shape=(out,), beta=1.0)


def _bias_add(g: GraphIndex, output: str, out: int, axis_from_end: int, max_rank: int) -> StoredBias | None:
    """The bias of an Add of a per-output constant that is the only user of ``output``."""
    add = g.sole_user(output, "Add")
    if add is None:
        return None
    other = add.input[1] if add.input[0] == output else add.input[0]
    found = bias(g, other, out, axis_from_end)
    if isinstance(found, Rejection) or len(g.inits[found.init].dims) > max_rank:
        return None
    return StoredBias(found.init, found.shape, found.quantized, found.factor, node=add.name, output=add.output[0])


def folds_rows(g: GraphIndex, tensor: str, features: int) -> bool:
    """Whether ``tensor`` is a Reshape to rank 2 that folds the batch and at least one more leading
    axis into the rows: (batch, sequence, ..., f1, f2) -> (batch x sequence, f1 x f2 = features).
    A flatten (N, C, H, W) -> (N, C x H x W) keeps the batch alone in the rows and is not one."""
    node = g.producers.get(tensor)
    if node is None or node.op_type != "Reshape" or g.ranks.get(tensor) != 2:
        return False
    before = g.dims.get(node.input[0], ())
    product = 1
    for start in range(len(before) - 1, 0, -1):  # the shortest trailing block that makes the features
        dim = before[start]
        if dim is None:
            return len(before) >= 3 and kept_last_axis(g, Constants(g), node, len(before)) == 2
        product *= dim
        if product >= features:
            return product == features and start >= 2
    return False


def match_gemm(g: GraphIndex, node: onnx.NodeProto) -> Layer | Rejection:
    attrs = attributes(node)
    if attrs.get("transA", 0):
        return fail("Gemm with transA=1")
    weight = node_weight(g, node.input[1], rank=2)
    if isinstance(weight, Rejection):
        return weight
    transposed = not attrs.get("transB", 0)
    out, inp = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
    beta = float(attrs.get("beta", 1.0))
    stored = None
    if len(node.input) > 2 and node.input[2] and beta != 0.0:  # beta = 0 (jax2onnx): C is ignored, no bias
        found = bias(g, node.input[2], out, 1)
        if isinstance(found, Rejection):
            return found
        stored = found
    folded = folds_rows(g, node.input[0], int(inp))
    return Layer(name=node.name, op="Gemm", node=node.name, weight=weight.init, input=node.input[0],
                 preact=node.output[0], out_features=int(out), in_features=int(inp), transposed=transposed,
                 alpha=float(attrs.get("alpha", 1.0)), weight_path=weight.steps, weight_shape=weight.shape,
                 kind="folded" if folded else "dense",
                 **_bias_fields(g, node.output[0], int(out), stored, beta, batchnorm_axis=not folded))


def match_matmul(g: GraphIndex, node: onnx.NodeProto) -> Layer | Rejection:
    if not isinstance(weight_path(g, node.input[0]), Rejection) and isinstance(weight_path(g, node.input[1]), Rejection):
        return fail("weight on the left of MatMul (W @ z) is not supported")
    weight = node_weight(g, node.input[1], rank=2)
    if isinstance(weight, Rejection):
        return weight
    rank = g.ranks.get(node.input[0])
    if rank is None:
        return fail("MatMul input has unknown rank (shape inference could not tell)")
    if rank < 2:
        return fail(f"MatMul input has rank {rank}; a layer needs a batch axis")
    inp, out = weight.shape
    stored = _bias_add(g, node.output[0], int(out), 1, max_rank=rank)
    preact = stored.output if stored is not None and stored.output else node.output[0]
    kind = "sequence" if rank > 2 else "folded" if folds_rows(g, node.input[0], int(inp)) else "dense"
    return Layer(name=node.name, op="MatMul", node=node.name, weight=weight.init, input=node.input[0], preact=preact,
                 out_features=int(out), in_features=int(inp), transposed=True,
                 kind=kind, weight_path=weight.steps, weight_shape=weight.shape,
                 **_bias_fields(g, preact, int(out), stored, 1.0, batchnorm_axis=kind == "dense"))


def match_conv(g: GraphIndex, node: onnx.NodeProto) -> Layer | Rejection:
    weight = node_weight(g, node.input[1])
    if isinstance(weight, Rejection):
        return weight
    geo = conv_geometry(attributes(node), weight.shape)
    if isinstance(geo, str):
        return fail(geo)
    out, spatial = int(weight.shape[0]), len(weight.shape) - 2
    stored: StoredBias | None = None
    preact = node.output[0]
    if len(node.input) > 2 and node.input[2]:
        own = bias(g, node.input[2], out, 1)
        if isinstance(own, Rejection):
            return own
        stored = StoredBias(own.init, (out,), own.quantized, own.factor)
    else:
        stored = _bias_add(g, node.output[0], out, spatial + 1, max_rank=spatial + 2)
        if stored is not None and stored.output:
            preact = stored.output
    return Layer(name=node.name, op="Conv", node=node.name, weight=weight.init, input=node.input[0], preact=preact,
                 out_features=out, in_features=int(np.prod(weight.shape[1:])), transposed=False, kind="conv",
                 conv=geo, weight_path=weight.steps, weight_shape=weight.shape,
                 **_bias_fields(g, preact, out, stored, 1.0, batchnorm_axis=True))


MATCHERS = {"Gemm": match_gemm, "MatMul": match_matmul, "Conv": match_conv}


def by_position(layer: Layer, g: np.ndarray) -> np.ndarray:
    """Derivatives at a pre-activation, (rows, *preact shape) -> (rows, out, positions)."""
    rows = len(g)
    if layer.kind in ("sequence", "folded"):  # (rows, ..., out): positions are the middle axes
        return np.moveaxis(g.reshape(rows, -1, layer.out_features), 2, 1)
    return g.reshape(rows, layer.out_features, -1)  # dense (rows, out) or conv (rows, out, *spatial)


def sample_major(layer: Layer, z: np.ndarray, samples: int) -> np.ndarray:
    """A tensor of a folded layer (samples x positions, features) as (samples, positions, features);
    any other layer's as it is."""
    if layer.kind != "folded":
        return z
    return np.asarray(z).reshape(samples, -1, *np.shape(z)[1:])


def folded_preacts(layers: list[Layer]) -> set[str]:
    """The pre-activations of the folded layers (their per-sample shape is (positions, out))."""
    return {layer.preact for layer in layers if layer.kind == "folded"}


def full_rows(layer: Layer, rows: np.ndarray) -> np.ndarray:
    """A grouped Conv's (out, in per group) rows spread over all input columns (zeros outside each
    row's group), so that column j is input channel j's block for every layer alike."""
    groups = layer.geometry.groups if layer.op == "Conv" else 1
    if groups == 1:
        return rows
    per_out, width = layer.out_features // groups, rows.shape[1]
    full = np.zeros((layer.out_features, groups * width))
    for g in range(groups):
        full[g * per_out:(g + 1) * per_out, g * width:(g + 1) * width] = rows[g * per_out:(g + 1) * per_out]
    return full
