"""The copies the analysis runs on, as sequences of small declared passes.

Each pass rewrites a model in place and returns a ``PassResult`` saying whether it changed it (as
onnx-ir's passes do); a pipeline copies the caller's model once, at the top, and runs its passes on
that copy. Two pipelines live here:

- ``runtime_copy``: what onnxruntime accepts (IR <= 10, opset 7..21), for every session;
- ``derivative_copy``: what the gradient engines differentiate: the runtime copy at the engine's
  opset, float32 where the model computes in float16/bfloat16, without activation fake
  quantization (a straight-through estimate: quantization has no gradient).

The analysis copy the layer matchers see (Constants as initializers, unshared initializers,
batch-first inputs, declared shapes) is ``onnxprune.prepare.analysis``; its passes follow the same pattern
and can be undone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph.index import attributes, default_opset, producers, subgraph_reads, tensor_ranks

MAX_IR_VERSION = 10   # onnxruntime 1.19 (the training build) accepts IR <= 10 ...
MAX_OPSET = 21        # ... and default-domain opset <= 21
MIN_OPSET = 7         # onnxruntime has no kernels for opset <= 6 Gemm, BatchNormalization, PRelu, Add, ...
HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
BATCH = "onnxprune__batch"


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the model changed, and a line for -v."""

    changed: bool
    note: str = ""


class Pass:
    """One in-place transformation. ``requires`` and ``ensures`` (in each docstring) say what it
    assumes of the model and what holds afterwards."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError


class ReversiblePass(Pass):
    """A pass of the analysis copy (``onnxprune.prepare.analysis``): ``restore`` undoes it on a pruned
    rewrite of the copy, so that the written model keeps its own form."""

    def restore(self, model: onnx.ModelProto) -> None:
        raise NotImplementedError


def run_passes(model: onnx.ModelProto, passes: list[Pass]) -> list[PassResult]:
    return [step(model) for step in passes]


def copied(model: onnx.ModelProto, passes: list[Pass]) -> onnx.ModelProto:
    """One copy of ``model`` with ``passes`` applied; ``model`` itself is not changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    run_passes(copy, passes)
    return copy


class StampForRuntime(Pass):
    """ensures: IR version <= MAX_IR_VERSION and default-domain opset <= MAX_OPSET (the written
    model keeps its own stamping; onnxruntime runs the kernels of the lower stamp, which the newer
    opsets did not change for the ops exporters write)."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        changed = model.ir_version > MAX_IR_VERSION
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
                opset.version, changed = MAX_OPSET, True
        return PassResult(changed, "stamped for onnxruntime" if changed else "")


class UpgradeOpset(Pass):
    """ensures: default-domain opset >= ``version`` when onnx's version converter can convert the
    model (names are kept); when it cannot, the model stays as it was and onnxruntime names the problem."""

    def __init__(self, version: int):
        self.version = version

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        current = default_opset(model)
        if current is None or current >= self.version:
            return PassResult(False)
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(_concrete_dims(model), self.version)
        except Exception:  # noqa: BLE001 - the converter raises plain RuntimeErrors/ValueErrors on adapters it lacks
            return PassResult(False, f"opset {current} kept: the converter cannot reach {self.version}")
        converted.ir_version = max(converted.ir_version, model.ir_version)
        for mine, theirs in ((model.graph.input, converted.graph.input), (model.graph.output, converted.graph.output)):
            types = {vi.name: vi.type for vi in mine}
            for vi in theirs:  # the original (symbolic) types back: the sizes of 1 only served the converter
                if vi.name in types:
                    vi.type.CopyFrom(types[vi.name])
        del converted.graph.value_info[:]
        model.CopyFrom(converted)
        return PassResult(True, f"opset {current} -> {self.version}")


def _concrete_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose symbolic dimensions (the batch 'N', ...) are 1: onnx's version converter runs
    shape inference and refuses symbolic dimensions in some adapters (Gemm 6 -> 7)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in [*copy.graph.input, *copy.graph.output, *copy.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1
    return copy


def has_half_floats(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return any(t.data_type in HALF_TYPES for t in graph.initializer) or any(
        vi.type.tensor_type.elem_type in HALF_TYPES for vi in [*graph.input, *graph.output])


class Float32(Pass):
    """ensures: the model computes in float32 where it used float16/bfloat16: initializers,
    Constant values, Cast targets, inputs, outputs and value infos. Statistics are taken in float32;
    the pruned model keeps its own types."""

    CASTING = ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        if not has_half_floats(model):
            return PassResult(False)
        graph = model.graph
        for i, t in enumerate(graph.initializer):
            if t.data_type in HALF_TYPES:
                graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.tensor_type.elem_type in HALF_TYPES:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type in self.CASTING and attr.name in ("to", "dtype") and attr.i in HALF_TYPES:
                    attr.i = TensorProto.FLOAT
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        return PassResult(True, "float32 copy of a half-precision model")


class StripFakeQuantization(Pass):
    """ensures: no DequantizeLinear(QuantizeLinear(x)) on an activation is left; each is Identity(x)."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        producer_of = producers(graph)
        stripped = 0
        for i, node in enumerate(graph.node):
            if node.op_type != "DequantizeLinear":
                continue
            q = producer_of.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                graph.node[i].CopyFrom(helper.make_node("Identity", [q.input[0]], [node.output[0]], name=node.name))
                stripped += 1
        return PassResult(bool(stripped), f"{stripped} fake quantizations read as identities" if stripped else "")


class AffineBatchNormalization(Pass):
    """ensures: every inference-mode BatchNormalization with constant parameters and a known input
    rank is spelled Mul + Add.

    The training build differentiates BatchNormalization as in training mode (through the batch
    statistics), which is not the function an exported model computes; x * f + (B - mean * f) with
    f = scale / sqrt(var + eps) is, and its gradient is the right one."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        ranks = tensor_ranks(model)
        spelled, i = 0, -1
        while i + 1 < len(graph.node):
            i += 1
            node = graph.node[i]
            if node.op_type != "BatchNormalization" or sum(1 for o in node.output if o) != 1:
                continue
            attrs = attributes(node)
            rank = ranks.get(node.input[0])
            if attrs.get("training_mode", 0) or rank is None or rank < 2 or not all(n in inits for n in node.input[1:5]):
                continue
            scale, bias, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[1:5])
            factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
            shape = (-1,) + (1,) * (rank - 2)
            dtype = numpy_helper.to_array(inits[node.input[1]]).dtype
            tag = f"{node.output[0]}__onnxprune_bn"
            graph.initializer.extend([
                numpy_helper.from_array(factor.reshape(shape).astype(dtype), f"{tag}_factor"),
                numpy_helper.from_array((bias - mean * factor).reshape(shape).astype(dtype), f"{tag}_shift")])
            x, y, name = node.input[0], node.output[0], node.name  # node is rewritten next
            graph.node[i].CopyFrom(helper.make_node("Mul", [x, f"{tag}_factor"], [f"{tag}_scaled"], name=f"{tag}_mul"))
            graph.node.insert(i + 1, helper.make_node("Add", [f"{tag}_scaled", f"{tag}_shift"], [y], name=name))
            spelled += 1
        return PassResult(bool(spelled), f"{spelled} BatchNormalizations as Mul + Add" if spelled else "")


class FreeBatch(Pass):
    """ensures: the real graph inputs and the outputs have a free first (batch) dimension (exporters
    often fix it to the example's batch size) and no stale intermediate shapes are declared."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        inits = {t.name for t in model.graph.initializer}
        for vi in [*(vi for vi in model.graph.input if vi.name not in inits), *model.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.HasField("tensor_type") and len(dims):
                dims[0].Clear()
                dims[0].dim_param = BATCH
        del model.graph.value_info[:]
        return PassResult(True)


class KeepNeeded(Pass):
    """ensures: only the nodes ``targets`` depend on are left (in order; reads inside If/Loop/Scan
    subgraphs count), and with ``initializers`` only the initializers they read."""

    def __init__(self, targets: set[str], initializers: bool = False):
        self.targets, self.initializers = targets, initializers

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        keep = needed_nodes(graph.node, self.targets)
        changed = len(keep) != len(graph.node)
        del graph.node[:]
        graph.node.extend(keep)
        if self.initializers:
            read = {i for node in keep for i in [*node.input, *subgraph_reads(node)]} | self.targets
            unused = [t for t in graph.initializer if t.name not in read]
            for tensor in unused:
                graph.initializer.remove(tensor)
            changed = changed or bool(unused)
        return PassResult(changed)


def needed_nodes(nodes, targets: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in order) that ``targets`` depend on, through subgraph (If/Loop/Scan) reads too."""
    needed, keep = set(targets), []
    for node in reversed(list(nodes)):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(subgraph_reads(node))
    return list(reversed(keep))


def needs_runtime_copy(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime needs ``model`` re-stamped (IR or default opset above what it runs, or an
    opset below its kernels): without, a session reads the model as it is, no copy made."""
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return model.ir_version > MAX_IR_VERSION or any(v > MAX_OPSET or v < MIN_OPSET for v in opsets)


def runtime_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that this onnxruntime accepts: stamped at most IR 10 / opset 21, and
    converted up to opset 7 when older. It shares nothing with ``model``."""
    return copied(model, [StampForRuntime(), UpgradeOpset(MIN_OPSET)])


def free_batch_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The runtime copy with a free batch dimension: what one- and two-sample runs that measure
    tensor shapes run on."""
    return copied(model, [StampForRuntime(), UpgradeOpset(MIN_OPSET), FreeBatch()])


def derivative_copy(model: onnx.ModelProto, min_opset: int | None = None) -> onnx.ModelProto:
    """The copy the gradient engines differentiate: runtime-stamped (converted up to ``min_opset``),
    float32, without activation fake quantization."""
    return copied(model, [StampForRuntime(), UpgradeOpset(MIN_OPSET), UpgradeOpset(max(MIN_OPSET, min_opset or 0)),
                          Float32(), StripFakeQuantization()])  # opset 7 first: kept if the engine's opset cannot be reached
