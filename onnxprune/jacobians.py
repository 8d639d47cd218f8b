"""Per-sample derivatives of the protected output at every layer's pre-activation.

We add a zero "offset" input to each layer's pre-activation, a probe input V shaped like the
protected output y, and the scalar objective sum(y * V); onnxruntime-training's native
GradientGraphBuilder then gives d objective / d offset. Samples do not interact, so row s of that
gradient is V_s^T J_s for sample s alone. Tiling each sample R times with R probes gives, in one
batched pass: the exact Jacobian rows (R = K one-hot probes) or R random Rademacher projections.
The same construction with a cross-entropy objective gives per-sample loss gradients (gradmag).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import runtime
from .errors import InputError
from .layers import Layer, tensor_types

PROBE = "onnxprune__probe"
LABELS = "onnxprune__labels"
OBJECTIVE = "onnxprune__objective"


def offset_name(layer: Layer) -> str:
    return f"onnxprune__offset__{layer.preact}"


def _instrument(model: onnx.ModelProto, layers: list[Layer], extra_outputs: list[str]) -> tuple[onnx.ModelProto, int]:
    """A runtime copy with an offset input added to every pre-activation; outputs = extra_outputs."""
    m = runtime.runtime_copy(model)
    graph = m.graph
    types = tensor_types(m)
    elem = types[layers[0].weight]
    producers = {out: node for node in graph.node for out in node.output}
    new_nodes = []
    for layer in layers:
        node = producers[layer.preact]
        raw = f"{layer.preact}__onnxprune_raw"
        node.output[list(node.output).index(layer.preact)] = raw
        new_nodes.append((node, helper.make_node("Add", [raw, offset_name(layer)], [layer.preact],
                                                 name=f"onnxprune__offset_add__{layer.name}")))
        graph.input.append(helper.make_tensor_value_info(offset_name(layer), elem, None))
    for producer, add in new_nodes:
        graph.node.insert(list(graph.node).index(producer) + 1, add)
    nodes = [n for node in graph.node for n in runtime.differentiable_nodes(node)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, types.get(name, elem), None) for name in extra_outputs)
    return m, elem


def output_shape(model: onnx.ModelProto, output: str, feeds: dict[str, np.ndarray], provider: str = "cpu") -> tuple[int, ...]:
    """Shape of tensor ``output`` for one sample (run on the first sample of ``feeds``)."""
    (value,) = runtime.run_tensors(model, {k: v[:1] for k, v in feeds.items()}, [output], provider)
    return tuple(value.shape[1:])


class _GradientModel:
    """Shared machinery: objective on top of the instrumented model, gradient graph, session."""

    def __init__(self, model, layers, output, objective_nodes, objective_inputs, provider="cpu", threads=None):
        self.layers = list(layers)
        self.inputs = {layer.input for layer in self.layers}
        graph_inputs = {vi.name for vi in model.graph.input}
        self.z_outputs = sorted(self.inputs - graph_inputs)
        m, elem = _instrument(model, self.layers, [OBJECTIVE] + self.z_outputs)
        for name, kind in objective_inputs:
            m.graph.input.append(helper.make_tensor_value_info(name, elem if kind == "float" else TensorProto.INT64, None))
        m.graph.node.extend(objective_nodes(output))
        builder, optimize, options = runtime.gradient_builder()
        offsets = {offset_name(layer) for layer in self.layers}
        quiet = options()
        quiet.log_severity_level = 3
        try:
            optimized = optimize(m.SerializeToString(), offsets, quiet)
            grad = builder(optimized, {OBJECTIVE}, offsets, OBJECTIVE, quiet)
            grad.build()
            graph_bytes = grad.get_model()
        except Exception as exc:  # the builder raises plain RuntimeErrors with ORT's message
            raise InputError(f"cannot build the gradient graph: {str(exc).splitlines()[0][:300]}") from None
        self.session = runtime.make_session(graph_bytes, provider, threads)
        self.fetch = [f"{offset_name(layer)}_grad" for layer in self.layers] + self.z_outputs
        self.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)

    def _run(self, feeds: dict[str, np.ndarray], rows: int, extra: dict[str, np.ndarray]):
        run_feeds = dict(feeds, **extra)
        for layer in self.layers:
            run_feeds[offset_name(layer)] = np.zeros((rows, layer.out_features), self.dtype)
        values = self.session.run(self.fetch, run_feeds)
        grads = dict(zip((layer.name for layer in self.layers), values[: len(self.layers)]))
        z = dict(zip(self.z_outputs, values[len(self.layers):]))
        return grads, z


class OutputJacobians(_GradientModel):
    """G_i = sum_k (dy_k/da_i)^2 per sample and layer, exact (K probes) or from ``probes`` random ones."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], output: str, output_size: int,
                 probes: int | None = None, seed: int = 0, provider: str = "cpu", threads: int | None = None):
        def objective(y):
            return [helper.make_node("Mul", [y, PROBE], [f"{OBJECTIVE}__yv"]),
                    helper.make_node("ReduceSum", [f"{OBJECTIVE}__yv"], [OBJECTIVE], keepdims=0)]

        super().__init__(model, layers, output, objective, [(PROBE, "float")], provider, threads)
        self.output_size = int(output_size)
        self.exact = probes is None
        self.repeats = self.output_size if self.exact else int(probes)
        self.rng = np.random.default_rng(seed)

    def __call__(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]):
        """Per-sample G (batch, out) for every layer and the layer inputs z (batch, in)."""
        n = len(next(iter(feeds.values())))
        r = self.repeats
        tiled = {k: np.repeat(v, r, axis=0) for k, v in feeds.items()}
        if self.exact:
            probe = np.tile(np.eye(self.output_size, dtype=self.dtype), (n, 1))
        else:
            probe = self.rng.choice(np.array([-1.0, 1.0], self.dtype), size=(n * r, self.output_size))
        probe = probe.reshape((n * r,) + tuple(output_shape))
        grads, z_tiled = self._run(tiled, n * r, {PROBE: probe})
        jac = {}
        for name, g in grads.items():
            g = g.astype(np.float64).reshape(n, r, -1)
            jac[name] = np.einsum("srk,srk->sk", g, g) / (1 if self.exact else r)
        inputs = {layer.name: (z_tiled[layer.input][::r] if layer.input in z_tiled else feeds[layer.input])
                  for layer in self.layers}
        return jac, inputs


class LossGradients(_GradientModel):
    """Per-sample d(cross-entropy)/d(pre-activation), for saliencies that use the training loss."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], output: str, provider: str = "cpu",
                 threads: int | None = None):
        def objective(y):
            return [helper.make_node("SoftmaxCrossEntropyLoss", [y, LABELS], [OBJECTIVE, f"{OBJECTIVE}__log_prob"],
                                     reduction="sum")]

        super().__init__(model, layers, output, objective, [(LABELS, "int")], provider, threads)

    def __call__(self, feeds: dict[str, np.ndarray], labels: np.ndarray):
        n = len(labels)
        grads, z = self._run(feeds, n, {LABELS: labels.astype(np.int64)})
        inputs = {layer.name: (z[layer.input] if layer.input in z else feeds[layer.input]) for layer in self.layers}
        return {k: v.astype(np.float64) for k, v in grads.items()}, inputs
