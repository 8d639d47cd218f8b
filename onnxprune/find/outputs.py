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
    types = None
    for candidate in graph.output:
        name = candidate.name
        node = producer_of.get(name)
        if node is not None and node.op_type == "ZipMap":
            name = node.input[0]
        if name == candidate.name and candidate.type.WhichOneof("value") not in (None, "tensor_type"):
            continue  # a sequence or map output
        elem = candidate.type.tensor_type.elem_type if name == candidate.name else 0
        if not elem:
            types = tensor_types(model) if types is None else types
            elem = types.get(name, 0)
        if elem and elem not in FLOAT_TYPES:
            continue  # labels, indices, strings
        return name
    raise InputError(f"the model has no float tensor output to protect (outputs: {[o.name for o in graph.output]}); "
                     "name one with --output")


def _before_probabilities(name: str, producer_of: dict[str, onnx.NodeProto]) -> str:
    """The logits behind a final Softmax/LogSoftmax/Sigmoid (also through Identity nodes), else ``name``."""
    node, walked = producer_of.get(name), name
    while node is not None and node.op_type in ("Identity", *SQUASHING_OPS):
        walked = node.input[0]
        if node.op_type in SQUASHING_OPS:
            name = walked
        node = producer_of.get(walked)
    return name


def reaching(model: onnx.ModelProto, layers: list[Layer], output: str) -> tuple[list[Layer], list[Skipped]]:
    """The layers whose pre-activation ``output`` depends on, and the others as Skipped: ECP would
    see no output sensitivity for them (G = 0) and prune them first."""
    needed = upstream(producers(model.graph), output)
    kept = [layer for layer in layers if layer.preact in needed]
    dropped = [Skipped(layer.node, layer.op, f"does not reach the protected output {output!r} (choose it with --output)")
               for layer in layers if layer.preact not in needed]
    return kept, dropped


def output_kind(model: onnx.ModelProto, name: str) -> str:
    """'logits', 'probabilities' or 'log-probabilities', from the node that produces ``name``."""
    node = producers(model.graph).get(name)
    return PROBABILITY_OPS.get(node.op_type, "logits") if node is not None else "logits"
