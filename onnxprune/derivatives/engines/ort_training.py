"""The ``ort-training`` engine: onnxruntime-training's native GradientGraphBuilder.

A scalar objective sum(y * V) with a probe input V is put on top of the instrumented copy; the
builder gives d objective / d offset. Row s of that gradient is V_s^T J_s for sample s alone.
Tiling each sample R times with R probes gives, in one batched pass, the exact Jacobian rows
(R = K one-hot probes) or R random Rademacher projections; ``SplitGradient`` avoids recomputing
the forward products once per probe. The same construction with a cross-entropy objective gives
per-sample loss gradients (gradmag). Only the training build (onnxruntime-training 1.19.2) has the
builder; ``onnxprune.derivatives.engines.adjoint`` needs none.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune import runtime
from onnxprune.derivatives.engines.base import EngineFailure, rademacher
from onnxprune.derivatives.instrument import LABELS, OBJECTIVE, PROBE, batch_dims, exposed, instrument, offset_name
from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, by_position, folded_preacts, sample_major
from onnxprune.graph.index import tensor_types
from onnxprune.graph.passes import BATCH, needed_nodes
from onnxprune.prepare.shapes import tensor_shapes


class _GradientModel:
    """Shared machinery: objective on top of the instrumented model, gradient graph, session.

    The gradient graph is built on the first call, when the data's per-sample shapes are known
    (and rebuilt if they change)."""

    min_opset: int | None = 13  # the gradient of Gemm-9 (C required) is a two-input Gemm

    def __init__(self, model, layers, output, objective_nodes, objective_inputs, provider="cpu", threads=None):
        self.model, self.layers, self.output = model, list(layers), output
        self.objective_nodes, self.objective_inputs = objective_nodes, objective_inputs
        self.provider, self.threads = provider, threads
        self.inputs = {layer.input for layer in self.layers}
        graph_inputs = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
        self.z_outputs = sorted(self.inputs - graph_inputs)
        self.session, self._signature, self.shapes = None, None, {}

    def _build(self, feeds: dict[str, np.ndarray]) -> None:
        signature = tuple(sorted((k, v.shape[1:]) for k, v in feeds.items()))
        if signature == self._signature:
            return
        names = list(feeds) + [layer.preact for layer in self.layers] + [self.output]
        self.shapes = tensor_shapes(self.model, names, feeds, self.provider, folded_preacts(self.layers))
        m, elem = instrument(self.model, self.layers, self.output, [OBJECTIVE] + self.z_outputs, self.shapes,
                             self.min_opset, spell=runtime.differentiable_nodes)
        for name, kind in self.objective_inputs:
            shape = batch_dims(self.shapes[self.output]) if kind == "float" else [BATCH]
            m.graph.input.append(helper.make_tensor_value_info(name, elem if kind == "float" else TensorProto.INT64, shape))
        m.graph.node.extend(self.objective_nodes(self.output))
        control = next((node for node in m.graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                              for a in node.attribute)), None)
        if control is not None:  # its builder aborts the process on some If/Loop/Scan graphs (no exception to catch)
            raise EngineFailure(f"onnxruntime-training does not differentiate graphs with {control.op_type} node "
                                f"{control.name!r} (subgraphs)")
        builder, optimize, options = runtime.gradient_builder()
        offsets = {offset_name(layer) for layer in self.layers}
        quiet = options()
        quiet.log_severity_level = 4
        try:
            optimized = optimize(m.SerializeToString(), offsets, quiet)
            grad = builder(optimized, {OBJECTIVE}, offsets, OBJECTIVE, quiet)
            grad.build()
            graph_bytes = grad.get_model()
        except Exception as exc:  # the builder raises plain RuntimeErrors with ORT's message
            raise EngineFailure(f"onnxruntime-training cannot build the gradient graph: {runtime.ort_message(exc)}") from None
        try:
            self.session = runtime.make_session(graph_bytes, self.provider, self.threads)
        except Exception as exc:  # e.g. no kernel for ConvTransposeGrad in the training build
            raise EngineFailure(f"onnxruntime-training cannot run the gradient graph ({runtime.ort_message(exc)})") from None
        self.fetch = [f"{offset_name(layer)}_grad" for layer in self.layers] + [exposed(z) for z in self.z_outputs]
        self.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        self.feed_types = {i.name: i.type for i in self.session.get_inputs()}
        self._signature = signature
        self._built(graph_bytes, feeds)

    def _built(self, graph_bytes: bytes, feeds: dict[str, np.ndarray]) -> None:
        """Hook: called after every (re)build with the gradient graph and the feeds it was built on."""

    def _cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Half-float feeds become float32 for the float32 copy."""
        return {k: v.astype(np.float32) if v.dtype in (np.float16,) or str(v.dtype) == "bfloat16" else v
                for k, v in feeds.items()}

    def _offsets(self, rows: int) -> dict[str, np.ndarray]:
        """Zero offsets for ``rows`` rows (kept for the next batch of the same size: inputs are read only)."""
        cache: tuple | None = getattr(self, "_zero_offsets", None)
        if cache is None or cache[0] != self._signature:
            cache = (self._signature, {})
            self._zero_offsets = cache
        if rows not in cache[1]:
            if len(cache[1]) > 4:  # a last, smaller batch; one gradient pass and its split use two sizes
                cache[1].clear()
            cache[1][rows] = {offset_name(layer): np.zeros((rows,) + self.shapes[layer.preact], self.dtype)
                              for layer in self.layers}
        return cache[1][rows]

    def _inputs(self, feeds: dict[str, np.ndarray], z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The layer inputs by layer name (computed ones from ``z``), a folded layer's rows grouped by sample."""
        n = len(next(iter(feeds.values())))
        return {layer.name: sample_major(layer, z[layer.input] if layer.input in z else self._cast(feeds)[layer.input], n)
                for layer in self.layers}

    def _run(self, feeds: dict[str, np.ndarray], rows: int, extra: dict[str, np.ndarray]):
        run_feeds = dict(self._cast(feeds), **extra)
        run_feeds.update(self._offsets(rows))
        try:
            values = self.session.run(self.fetch, run_feeds)
        except Exception as exc:  # noqa: BLE001 - a kernel refusing a shape or a value inside the gradient graph
            raise InputError(f"onnxruntime failed running the gradient graph: {runtime.ort_message(exc)}") from None
        grads = dict(zip((layer.name for layer in self.layers), values[: len(self.layers)]))
        z = dict(zip(self.z_outputs, values[len(self.layers):]))
        return grads, z


PRODUCT_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose", "Einsum", "FusedGemm", "FusedMatMul", "FusedConv"}


def split_graph(grad: onnx.ModelProto, probe: str, fetch: list[str], forward_outputs: list[str]):
    """Cut a gradient graph at the forward products that do not depend on ``probe``.

    Returns (forward nodes, backward nodes, cut) or None when no product feeds the backward part:
    the forward nodes compute the cut tensors (the products' outputs) and ``forward_outputs``; the
    backward nodes compute ``fetch`` from the cut tensors, the graph inputs and ``probe``, and
    recompute the cheap forward nodes they need (activations, offsets)."""
    nodes = list(grad.graph.node)
    tainted, backward = {probe}, set()
    for i, node in enumerate(nodes):  # ORT writes gradient graphs in topological order
        if tainted.intersection(node.input):
            tainted.update(node.output)
            backward.add(i)
    products = {i for i, node in enumerate(nodes) if i not in backward and node.op_type in PRODUCT_OPS}
    rest = needed_nodes([n for i, n in enumerate(nodes) if i not in products], set(fetch))
    used = {name for node in rest for name in node.input}
    cut = [out for i in sorted(products) for out in nodes[i].output if out and out in used]
    if not cut:
        return None
    forward = needed_nodes([n for i, n in enumerate(nodes) if i not in backward], set(cut) | set(forward_outputs))
    return forward, rest, cut


def _submodel(grad: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str], types: dict[str, int],
              new_inputs: Sequence[onnx.ValueInfoProto] = ()) -> bytes:
    """``grad`` reduced to ``nodes`` with ``outputs``, the graph inputs they use, and ``new_inputs``.

    The gradient graph's value_info is kept: without the shapes it records, the training build
    crashes creating a session for a MaxPoolGrad (a segfault, not an exception)."""
    m = onnx.ModelProto()
    m.CopyFrom(grad)
    graph = m.graph
    used = {name for node in nodes for name in node.input} | set(outputs)
    inputs = [vi for vi in graph.input if vi.name in used] + list(new_inputs)
    inits = [t for t in graph.initializer if t.name in used]
    declared = {vi.name for vi in inputs} | {t.name for t in inits} | set(outputs)
    produced = {name for node in nodes for name in node.output}
    info = [vi for vi in graph.value_info if vi.name in produced and vi.name not in declared]
    for field in ("node", "input", "initializer", "value_info", "output"):
        graph.ClearField(field)
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.initializer.extend(inits)
    graph.value_info.extend(info)
    graph.output.extend(helper.make_tensor_value_info(name, types[name], None) for name in outputs)
    return m.SerializeToString()


class SplitGradient:
    """Exact output-Jacobian rows without recomputing the forward pass once per probe.

    Tiling each sample R times (one row per probe) runs the forward pass R times, although only the
    backward pass depends on the probe. Here the gradient graph is cut at its forward products
    (Gemm, MatMul, Conv: the expensive nodes that do not depend on the probe): a forward session
    computes them once per sample, and a backward session takes them, repeated R times, as inputs
    and runs the rest (the backward pass, and the cheap element-wise forward nodes it needs,
    recomputed). A product whose first axis is not the batch would break this, so the split is
    checked against the tiled graph on two samples when it is built, and not used if they differ.
    """

    def __init__(self, forward, backward, cut: list[str], fetch: list[str], z_outputs: list[str], jac):
        self.forward, self.backward, self.cut, self.fetch, self.z_outputs = forward, backward, cut, fetch, z_outputs
        self.jac = jac
        self._buffers: dict[str, np.ndarray] = {}
        self.forward_inputs = {i.name for i in forward.get_inputs()}
        self.backward_inputs = {i.name for i in backward.get_inputs()}

    @classmethod
    def build(cls, jac, graph_bytes: bytes, fetch: list[str], feeds: dict[str, np.ndarray]) -> SplitGradient | None:
        """The split sessions for ``jac``'s gradient graph, or None (use the tiled graph)."""
        grad = onnx.load_from_string(graph_bytes)
        parts = split_graph(grad, PROBE, fetch, jac.z_outputs)
        if parts is None:
            return None
        forward_nodes, backward_nodes, cut = parts
        if set(cut) & set(jac.z_outputs):
            return None
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(jac.dtype))
        types = {**{name: elem for name in cut}, **tensor_types(grad)}
        types.update({vi.name: vi.type.tensor_type.elem_type for vi in grad.graph.output})
        try:
            forward = runtime.make_session(_submodel(grad, forward_nodes, cut + jac.z_outputs, types),
                                           jac.provider, jac.threads)
            sample = {k: v[:2] for k, v in jac._cast(feeds).items()}
            n = len(next(iter(sample.values())))
            first = dict(zip(cut, forward.run(cut, cls._only(forward, {**sample, **jac._offsets(n)}))))
            declared = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), batch_dims(v.shape[1:]))
                        for name, v in first.items()]
            backward = runtime.make_session(_submodel(grad, backward_nodes, fetch, types, declared),
                                            jac.provider, jac.threads)
            split = cls(forward, backward, cut, fetch, jac.z_outputs, jac)
            probe = np.random.default_rng(0).standard_normal((n * jac.repeats,) + jac.shapes[jac.output]).astype(jac.dtype)
            got, _ = split.run(sample, probe)
            want, _ = jac._tiled_rows(sample, probe)
        except Exception:  # an op or a layout the split does not understand: the tiled graph is exact
            return None
        for name, value in want.items():
            scale = float(np.max(np.abs(value))) if value.size else 0.0
            if got[name].shape != value.shape or not np.allclose(got[name], value, rtol=1e-4, atol=1e-5 * scale + 1e-30):
                return None
        return split

    @staticmethod
    def _only(session_inputs, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = session_inputs if isinstance(session_inputs, set) else {i.name for i in session_inputs.get_inputs()}
        return {k: v for k, v in feeds.items() if k in names}

    def _repeat(self, name: str, value: np.ndarray, r: int, n: int) -> np.ndarray:
        """``value`` with every sample's rows repeated ``r`` times (a folded tensor has several rows per
        sample, kept together), in a buffer reused across batches."""
        shape = (len(value) * r,) + value.shape[1:]
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != value.dtype:
            buffer = self._buffers[name] = np.empty(shape, value.dtype)
        per = (n, len(value) // n) + value.shape[1:]
        buffer.reshape((n, r) + per[1:])[...] = value.reshape(per)[:, None]
        return buffer

    def run(self, feeds: dict[str, np.ndarray], probe: np.ndarray):
        """(gradients by layer name, (n * R, ...) rows; layer inputs by tensor name, (n, ...) rows)."""
        jac = self.jac
        n = len(next(iter(feeds.values())))
        r = len(probe) // n
        values = self.forward.run(self.cut + self.z_outputs, self._only(self.forward_inputs, {**feeds, **jac._offsets(n)}))
        tiled = {name: self._repeat(name, v, r, n) for name, v in zip(self.cut, values)}
        tiled.update({k: self._repeat(k, v, r, n) for k, v in feeds.items() if k in self.backward_inputs})
        tiled.update(jac._offsets(n * r))
        tiled[PROBE] = probe
        grads = self.backward.run(self.fetch, self._only(self.backward_inputs, tiled))
        return (dict(zip((layer.name for layer in jac.layers), grads)),
                dict(zip(self.z_outputs, values[len(self.cut):])))


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
        self.repeats = self.output_size if probes is None else int(probes)
        self.scale = 1.0 if self.exact else 1.0 / self.repeats
        self.rng = np.random.default_rng(seed)

    def _built(self, graph_bytes: bytes, feeds: dict[str, np.ndarray]) -> None:
        """Split the gradient graph at its products when that gives the same rows (see SplitGradient)."""
        self.split = None
        if self.repeats > 1:
            fetch = [f"{offset_name(layer)}_grad" for layer in self.layers]
            self.split = SplitGradient.build(self, graph_bytes, fetch, feeds)

    def _probes(self, n: int, output_shape: tuple[int, ...], exact: bool | None = None) -> np.ndarray:
        exact = self.exact if exact is None else exact
        r = self.repeats
        if exact:
            probe = np.tile(np.eye(self.output_size, dtype=self.dtype), (n, 1))
        else:
            probe = rademacher(self.rng, (n * r, self.output_size), self.dtype)
        return probe.reshape((n * r,) + tuple(output_shape))

    def _tiled_rows(self, feeds: dict[str, np.ndarray], probe: np.ndarray):
        """Every sample repeated R times through the whole gradient graph: (grads, layer inputs)."""
        r = self.repeats
        tiled = {k: np.repeat(v, r, axis=0) for k, v in feeds.items()}
        grads, z_tiled = self._run(tiled, len(probe), {PROBE: probe})
        n = len(next(iter(feeds.values())))  # the first copy of every sample (a folded tensor's rows are sample-major)
        return grads, {name: z.reshape(n, r, -1, *z.shape[1:])[:, 0].reshape(-1, *z.shape[1:]) for name, z in z_tiled.items()}

    def rows(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]):
        """Per layer the derivatives of every probe, (batch, R, out, positions) (positions = 1 for a
        2-D layer), and the layer inputs z as the graph has them (batch, ...)."""
        self._build(feeds)
        n = len(next(iter(feeds.values())))
        r = self.repeats
        probe = self._probes(n, output_shape)
        if self.split is not None:
            grads, z = self.split.run(self._cast(feeds), probe)
        else:
            grads, z = self._tiled_rows(feeds, probe)
        layers = {layer.name: layer for layer in self.layers}
        out = {name: by_position(layers[name], g).reshape(n, r, layers[name].out_features, -1) for name, g in grads.items()}
        return out, self._inputs(feeds, z)

    def squares(self, feeds: dict[str, np.ndarray], output_shape: tuple[int, ...]):
        """Per layer G = sum_k (dy_k/da)^2 (batch, out) for single-use layers (squared in the runtime's
        float type, float64 beyond its range), the rows for shared-weight layers; and the layer inputs."""
        rows, inputs = self.rows(feeds, output_shape)
        out = {}
        for layer in self.layers:
            g = rows[layer.name]
            if not layer.shared:
                g = g[..., 0]
                big_g = np.einsum("sro,sro->so", g, g) * g.dtype.type(self.scale)
                if not np.isfinite(big_g).all():
                    g = g.astype(np.float64)
                    big_g = np.einsum("sro,sro->so", g, g) * self.scale
                g = big_g
            out[layer.name] = g
        return out, inputs


class LossGradients(_GradientModel):
    """Per-sample d(cross-entropy)/d(pre-activation), for saliencies that use the training loss."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], output: str, provider: str = "cpu",
                 threads: int | None = None):
        def objective(y):
            return [helper.make_node("SoftmaxCrossEntropyLoss", [y, LABELS], [OBJECTIVE, f"{OBJECTIVE}__log_prob"],
                                     reduction="sum")]

        super().__init__(model, layers, output, objective, [(LABELS, "int")], provider, threads)

    def __call__(self, feeds: dict[str, np.ndarray], labels: np.ndarray):
        """Per layer dL/da (batch, out) for a 2-D layer, (batch, out, positions) for a shared-weight
        one, and the layer inputs as the graph has them."""
        self._build(feeds)
        n = len(labels)
        grads, z = self._run(feeds, n, {LABELS: labels.astype(np.int64)})
        layers = {layer.name: layer for layer in self.layers}
        out = {}
        for name, g in grads.items():
            g = by_position(layers[name], g.astype(np.float64))
            out[name] = g[:, :, 0] if not layers[name].shared else g
        return out, self._inputs(feeds, z)
