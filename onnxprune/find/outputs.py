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
    """The logits behind a final Softmax/LogSoftmax/Sigmoid (also through Identity nodes), else ``name``."""
    node, walked = producer_of.get(name), name
    while node is not None and node.op_type in ("Identity", *SQUASHING_OPS):
        walked = node.input[0]
        if node.op_type in SQUASHING_OPS:
            name = walked
        node = producer_of.get(walked)
    return name


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
