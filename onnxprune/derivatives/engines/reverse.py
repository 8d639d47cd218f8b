"""onnx-ad's reverse mode as the adjoint engine calls it: derivative nodes named after the model's nodes, and errors naming them.

onnx-ad leaves the nodes of a derivative graph unnamed, so onnxruntime's errors about them read
"Node () Op (Expand)". Here every node a reverse rule emits is named after the node it
differentiates (``<node>__onnxprune_adjoint_<k>``), the others (sums of contributions, the final
broadcasts to the offsets' shapes) after the node their first input derives from; ``origin`` turns
an onnxruntime message back into the model's node.
"""
from __future__ import annotations

import contextlib
import re

import onnx

from onnxprune import runtime
from onnxprune.derivatives.engines.base import EngineFailure

ADJOINT = "__onnxprune_adjoint_"


@contextlib.contextmanager
def _named_adjoints(current: dict):
    """onnx-ad's reverse rules, each naming the nodes it emits after the node it differentiates
    (``<node>__onnxprune_adjoint_<k>``), so that an error inside the derivative graph can name the
    model's node (onnx-ad leaves its nodes unnamed); ``current["node"]`` is the node being
    differentiated (a rule's refusal names only its op)."""
    from onnx_ad.rules import REVERSE

    original = dict(REVERSE)

    def named(rule):
        def run(ctx, node, grads):
            builder, start = ctx.b, len(ctx.b.nodes)
            current["node"] = node
            contributions = rule(ctx, node, grads)
            if ctx.b is builder:
                for k, emitted in enumerate(builder.nodes[start:]):
                    emitted.name = emitted.name or f"{node.name or node.output[0]}{ADJOINT}{k}"
            return contributions
        return run

    REVERSE.update({op: named(rule) for op, rule in original.items()})
    try:
        yield
    finally:
        REVERSE.clear()
        REVERSE.update(original)


def _name_the_rest(grad: onnx.ModelProto) -> None:
    """Name the derivative nodes no rule emitted (sums of contributions, the final broadcasts to the
    offsets' shapes) after the node the first of their inputs derives from, the others after their
    position: no node is left unnamed."""
    origin: dict[str, str] = {}
    for k, node in enumerate(grad.graph.node):
        source = node.name.split(ADJOINT)[0] if ADJOINT in node.name else None
        if not node.name:
            source = next((origin[name] for name in node.input if name in origin), None)
            node.name = f"{source}{ADJOINT}r{k}" if source else f"onnxprune__derivative_node_{k}"
        if source:
            origin.update((out, source) for out in node.output if out)


def reverse_graph(m: onnx.ModelProto, offsets: list[str], seeded: str) -> onnx.ModelProto:
    from onnx_ad import UnsupportedOperator, reverse

    current: dict = {"node": None}
    try:
        with _named_adjoints(current):
            grad = reverse(m, inputs=offsets, outputs=[seeded], layout="onnx", prefix="onnxprune__adj__")
        _name_the_rest(grad)
        return grad
    except UnsupportedOperator as exc:
        node = current["node"]
        culprit = (f"{node.op_type} node {node.name or node.output[0]!r}" if node is not None and node.op_type in str(exc)
                   else _culprit(m, str(exc)))
        raise EngineFailure(f"onnx-ad cannot differentiate {culprit}: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - onnx-ad raises plain errors on graphs it does not understand
        raise EngineFailure(f"onnx-ad cannot build the derivative graph: {type(exc).__name__}: {_one_line(exc)}") from None


def origin(model: onnx.ModelProto, exc: BaseException) -> str:
    """onnxruntime's message about ``exc``, with the node of ``model`` behind the derivative graph's
    node it names."""
    message = runtime.ort_message(exc)
    found = re.search(r"Node \(([^)]*)\) Op \((\w+)\)|Name:'([^']*)'", str(exc))
    name = (found.group(1) or found.group(3) or "") if found else ""
    ops = {node.name: node.op_type for node in model.graph.node}
    original = name.split(ADJOINT)[0] if ADJOINT in name else name
    if original in ops:
        role = "the derivative of" if ADJOINT in name else "the forward pass of"
        return f"{message} (in {role} {ops[original]} node {original!r})"
    return message


def _culprit(m: onnx.ModelProto, message: str) -> str:
    """'<op> node <name>' for the first node whose op type the message names (onnx-ad names the op,
    not the node), else 'the model'."""
    for node in m.graph.node:
        if re.search(rf"\b{re.escape(node.op_type)}\b", message):
            return f"{node.op_type} node {node.name or node.output[0]!r}"
    return "the model"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]
