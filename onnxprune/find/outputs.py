"""Which output the pruning protects and the evaluation scores, and which layers reach it."""
from __future__ import annotations

import onnx

from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, Skipped
from onnxprune.graph.index import FLOAT_TYPES, producers, tensor_types, upstream

PROBABILITY_OPS = {"Softmax": "probabilities", "LogSoftmax": "log-probabilities"}
# Final ops whose input ECP protects instead of their output: a saturated probability hides the
# error its logit carries (the map of a text detector: most of its pixels near 0 or 1).
SQUASHING_OPS = (*PROBABILITY_OPS, "Sigmoid")


def protected_output(model: onnx.ModelProto, output: str | None = None) -> str:
    """The tensor ECP protects: ``output`` if given, else the model's scores (``scored_output``)
    read before a final Softmax, LogSoftmax or Sigmoid (the logits are protected)."""
    name = scored_output(model, output)
    if output is not None:
        return name
    return _before_probabilities(name, producers(model.graph))


def protected_outputs(model: onnx.ModelProto, outputs: list[str] | None = None) -> list[str]:
    """The tensors pruning protects: ``outputs`` as given, else every float graph output (each read
    before a final Softmax, LogSoftmax or Sigmoid; a ZipMap's input instead of the ZipMap), so that
    no output of the model is free to damage."""
    if outputs:
        return list(dict.fromkeys(scored_output(model, name) for name in outputs))
    producer_of = producers(model.graph)
    found = []
    for candidate in model.graph.output:
        name = _float_output(model, candidate, producer_of)
        if name is not None:
            found.append(_before_probabilities(name, producer_of))
    if not found:
        return [scored_output(model)]  # its error names the outputs
    return list(dict.fromkeys(found))


def _float_output(model: onnx.ModelProto, candidate: onnx.ValueInfoProto, producer_of) -> str | None:
    """The float tensor graph output ``candidate`` scores (a ZipMap's input), or None (labels, maps)."""
    name = candidate.name
    node = producer_of.get(name)
    if node is not None and node.op_type == "ZipMap":
        name = node.input[0]
    if name == candidate.name and candidate.type.WhichOneof("value") not in (None, "tensor_type"):
        return None
    elem = candidate.type.tensor_type.elem_type if name == candidate.name else 0
    if not elem:
        elem = tensor_types(model).get(name, 0)
    return None if elem and elem not in FLOAT_TYPES else name


def scored_output(model: onnx.ModelProto, output: str | None = None) -> str:
    """The model's scores: ``output`` if given (a graph output or any node output), else the first
    graph output that is a float tensor, read before a ZipMap (skl2onnx classifiers: the label
    output and the ZipMap of probabilities are passed over). What ``evaluate`` scores."""
    graph = model.graph
    producer_of = producers(graph)
    if output is not None:
        if output not in producer_of:
            raise InputError(f"no tensor named {output!r} in the model (outputs: {[o.name for o in graph.output]})")
        return output
    for candidate in graph.output:
        name = _float_output(model, candidate, producer_of)
        if name is not None:  # not labels, indices, strings, a sequence or a map
            return name
    raise InputError(f"the model has no float tensor output to protect (outputs: {[o.name for o in graph.output]}); "
                     "name one with --output")


def _before_probabilities(name: str, producer_of: dict[str, onnx.NodeProto]) -> str:
    """The logits behind a final Softmax/LogSoftmax/Sigmoid, or a softmax written out in elementary
    ops (also through Identity nodes), else ``name``."""
    node, walked = producer_of.get(name), name
    while node is not None:
        if node.op_type == "Identity":
            walked = node.input[0]
        elif node.op_type in SQUASHING_OPS:
            walked = name = node.input[0]
        elif (logits := _written_out_softmax(node, producer_of)) is not None:
            walked = name = logits
        else:
            break
        node = producer_of.get(walked)
    return name


# Ops that only move or broadcast values: a softmax's sum or max reaches its Div or Sub through them.
_RESHAPING = ("Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast")


def _through_reshapes(name: str, producer_of: dict[str, onnx.NodeProto], also=()) -> onnx.NodeProto | None:
    """The first node above ``name`` that is not a reshape (nor one of ``also``, whose computed
    input is followed: Max(floor, m) clamps m); a reshape is followed by its input 0."""
    node = producer_of.get(name)
    while node is not None and (node.op_type in _RESHAPING or node.op_type in also) and node.input:
        computed = [producer_of[i] for i in node.input if i in producer_of and producer_of[i].op_type != "Constant"]
        node = computed[0] if node.op_type in also and computed else producer_of.get(node.input[0])
    return node


def _written_out_softmax(node: onnx.NodeProto, producer_of: dict[str, onnx.NodeProto]) -> str | None:
    """The logits x of Div(e, ReduceSum(e)) with e = Exp(x) or Exp(x - ReduceMax(x)) (jax2tf and other
    exporters write softmax out so, broadcasts between), else None: a saturated softmax hides its
    logits' error from first-order scores as a Softmax node does."""
    if node.op_type != "Div" or len(node.input) != 2:
        return None
    exp = producer_of.get(node.input[0])
    total = _through_reshapes(node.input[1], producer_of)
    if exp is None or exp.op_type != "Exp" or total is None or total.op_type != "ReduceSum":
        return None
    if not total.input or total.input[0] != node.input[0]:
        return None
    shifted = producer_of.get(exp.input[0])
    if shifted is not None and shifted.op_type == "Sub" and len(shifted.input) == 2:
        # the max a stable softmax subtracts (through Max(m, floor) clamps and broadcasts)
        peak = _through_reshapes(shifted.input[1], producer_of, also=("Max",))
        if peak is not None and peak.op_type == "ReduceMax" and peak.input and peak.input[0] == shifted.input[0]:
            return shifted.input[0]
    return exp.input[0]


def reaching(model: onnx.ModelProto, layers: list[Layer], output: str | list[str]) -> tuple[list[Layer], list[Skipped]]:
    """The layers whose pre-activation ``output`` (one name or several) depends on, and the others as
    Skipped: ECP would see no output sensitivity for them (G = 0) and prune them first."""
    names = [output] if isinstance(output, str) else list(output)
    producer_of = producers(model.graph)
    needed = set().union(*(upstream(producer_of, name) for name in names))
    kept = [layer for layer in layers if layer.preact in needed]
    shown = names[0] if len(names) == 1 else names
    dropped = [Skipped(layer.node, layer.op, f"does not reach the protected output {shown!r} (choose it with --output)")
               for layer in layers if layer.preact not in needed]
    return kept, dropped


def output_kind(model: onnx.ModelProto, name: str) -> str:
    """'logits', 'probabilities' or 'log-probabilities', from the node that produces ``name``."""
    node = producers(model.graph).get(name)
    return PROBABILITY_OPS.get(node.op_type, "logits") if node is not None else "logits"
