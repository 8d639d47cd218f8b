"""The two training back ends behind ``onnxprune.finetune``: one optimizer step at a time.

- ``AdjointTrainer``: the trainable weights are lifted to graph inputs, the loss is appended to the
  logits, and onnx-ad turns that into its reverse-mode graph (loss and weight gradients in one plain
  inference session, any onnxruntime build); Adam steps in numpy (``AdjointLoss`` is the graph).
- ``OrtTrainer``: onnxruntime-training's artifacts (training, eval, checkpoint and optimizer graphs)
  driven by its api.Module/Optimizer, with PyTorch's Adam settings (eps 1e-8, no weight decay,
  ``adam_mode=0``).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.derivatives.engines.adjoint import MIN_OPSET as ADJOINT_MIN_OPSET
from onnxprune.errors import InputError
from onnxprune.graph.passes import KeepNeeded, UpgradeOpset, copied
from onnxprune.runtime import differentiable_nodes, make_session, session_options, training_modules

BETAS, EPS = (0.9, 0.999), 1e-8
_SEEDS = "onnxprune_seeds"  # the adjoint graph's seed axis: one seed, the scalar loss's


def model_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"fine-tuning needs a model with one data input, this one has {len(inputs)}")
    return inputs[0]


class AdjointLoss:
    """The mean softmax cross-entropy of ``logits_model`` and its gradient with respect to the
    weights ``trainable``, from one onnx-ad reverse-mode graph run in an InferenceSession.

    The weights become graph inputs (fed at every call, so numpy owns them), the labels come in as
    one-hot rows divided by the batch size (the mean is then a plain sum), and the loss is seeded
    by a scalar 1. onnx-ad's Conv and Slice rules need fully static shapes, batch included, so the
    graph is built for ``batch`` samples of ``sample_shape``; a smaller batch is padded with copies
    of its rows whose targets are zero, which adds exactly nothing to the loss and its gradient
    (an inference-mode classifier treats samples independently).
    """

    def __init__(self, logits_model: onnx.ModelProto, trainable: list[str], batch: int, sample_shape: tuple[int, ...],
                 classes: int, threads: int | None = 1):
        from onnx_ad import UnsupportedOperator, reverse

        model = copied(logits_model, [UpgradeOpset(ADJOINT_MIN_OPSET)])
        graph, tag = model.graph, "onnxprune.finetune"
        self.input, self.targets, self.loss = model_input(model).name, f"{tag}.targets", f"{tag}.loss"
        self.batch, self.classes = batch, classes
        data = next(i for i in graph.input if i.name == self.input)
        dims = data.type.tensor_type.shape.dim
        del dims[:]
        for size in (batch, *sample_shape):
            dims.add().dim_value = size
        lifted = [t for t in graph.initializer if t.name in trainable]
        declared = {i.name for i in graph.input}
        for tensor in lifted:
            graph.initializer.remove(tensor)
            if tensor.name not in declared:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        _ungroup_convs(graph, trainable)
        (logits,) = [o.name for o in graph.output]
        make = onnx.helper.make_node
        graph.input.append(onnx.helper.make_tensor_value_info(self.targets, onnx.TensorProto.FLOAT, [batch, classes]))
        graph.node.extend([
            make("LogSoftmax", [logits], [f"{tag}.log_p"], name=f"{tag}.log_softmax", axis=1),
            make("Mul", [f"{tag}.log_p", self.targets], [f"{tag}.weighted"], name=f"{tag}.weigh"),
            make("ReduceSum", [f"{tag}.weighted"], [f"{tag}.sum"], name=f"{tag}.sum", keepdims=0),
            make("Neg", [f"{tag}.sum"], [self.loss], name=f"{tag}.neg"),
        ])
        del graph.output[:]
        graph.output.append(onnx.helper.make_tensor_value_info(self.loss, onnx.TensorProto.FLOAT, []))
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        try:
            derivative = reverse(model, inputs=trainable, outputs=[self.loss], layout="onnx", dim=_SEEDS)
        except UnsupportedOperator as exc:
            raise InputError(f"onnx-ad cannot differentiate this model: {exc}") from exc
        derivative = _one_seed(derivative)
        self.seed = derivative.graph.input[-1].name
        self.gradients = [o.name for o in derivative.graph.output[-len(trainable):]]
        self.trainable = list(trainable)
        self.session = make_session(derivative, threads=threads)

    def __call__(self, x: np.ndarray, labels: np.ndarray, weights: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """(mean cross-entropy, {weight name: d loss / d weight}) on the batch (x, labels)."""
        if not 0 < len(x) <= self.batch:
            raise ValueError(f"this loss graph takes 1 to {self.batch} samples, got {len(x)}")
        targets = np.zeros((self.batch, self.classes), np.float32)
        targets[np.arange(len(x)), labels] = np.float32(1 / len(x))
        padded = x if len(x) == self.batch else x[np.resize(np.arange(len(x)), self.batch)]
        feeds = {self.input: padded, self.targets: targets, self.seed: np.ones(1, np.float32), **weights}
        loss, *gradients = self.session.run([self.loss, *self.gradients], feeds)
        return float(loss), {name: g.reshape(weights[name].shape) for name, g in zip(self.trainable, gradients)}


def _ungroup_convs(graph: onnx.GraphProto, trainable: list[str]) -> None:
    """Every grouped Conv whose weight is trained, as one Conv per group between Splits (of the
    input channels, the weight, the bias) and a Concat: the same function, and onnx-ad 0.3 has no
    rule for a grouped Conv's weight adjoint. ``graph`` declares the trained weights as inputs."""
    declared = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.input}
    make, nodes = onnx.helper.make_node, []
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group == 1 or node.input[1] not in trainable:
            nodes.append(node)
            continue
        out_channels, in_per_group = declared[node.input[1]][:2]
        tag = f"{node.name or node.output[0]}.ungrouped"
        graph.initializer.extend([numpy_helper.from_array(np.full(group, in_per_group, np.int64), f"{tag}.in_split"),
                                  numpy_helper.from_array(np.full(group, out_channels // group, np.int64), f"{tag}.out_split")])
        operands = [(name, f"{tag}.{role}", "in_split" if role == "x" else "out_split", 1 if role == "x" else 0)
                    for name, role in zip(node.input, ("x", "w", "b")) if name]
        for name, role, split, axis in operands:
            nodes.append(make("Split", [name, f"{tag}.{split}"], [f"{role}{g}" for g in range(group)], name=f"{role}.split",
                              axis=axis))
        attributes = [a for a in node.attribute if a.name != "group"]
        for g in range(group):
            conv = make("Conv", [f"{role}{g}" for _, role, _, _ in operands], [f"{tag}.y{g}"], name=f"{tag}.conv{g}")
            conv.attribute.extend(attributes)
            nodes.append(conv)
        nodes.append(make("Concat", [f"{tag}.y{g}" for g in range(group)], [node.output[0]], name=f"{tag}.concat", axis=1))
    del graph.node[:]
    graph.node.extend(nodes)


def _one_seed(derivative: onnx.ModelProto) -> onnx.ModelProto:
    """``derivative`` with its seed axis fixed at 1, every Transpose that then only moves unit axes
    written as the Reshape it is (it moves no data, but onnxruntime runs it as a transpose), and
    without the adjoints of the data input that onnx-ad emits but no output reads (onnxruntime runs
    them too). Together they halve a session run of the MNIST MLP (paired, batch 128)."""
    for value in list(derivative.graph.input) + list(derivative.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == _SEEDS:
                dim.dim_value = 1
    del derivative.graph.value_info[:]
    derivative = onnx.shape_inference.infer_shapes(derivative, data_prop=True)
    graph = derivative.graph
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in [*graph.input, *graph.value_info, *graph.output] if value.type.tensor_type.HasField("shape")}
    for node in graph.node:
        before, after = shapes.get(node.input[0]) if node.input else None, shapes.get(node.output[0])
        if node.op_type != "Transpose" or not before or not after or None in before or None in after:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(before)))[::-1])
        moved = [axis for axis in perm if before[axis] != 1]
        if moved == sorted(moved):
            shape = f"{node.output[0]}.as_reshape"
            graph.initializer.append(numpy_helper.from_array(np.array(after, np.int64), shape))
            node.op_type = "Reshape"
            del node.attribute[:]
            node.input.append(shape)
    KeepNeeded({o.name for o in graph.output}, initializers=True)(derivative)
    return derivative


class AdjointTrainer:
    """AdjointLoss + torch.optim.Adam's update in numpy, float32 like ORT's AdamWOptimizer."""

    def __init__(self, loss: AdjointLoss, start: dict[str, np.ndarray], lr: float):
        self.loss, self.lr, self.t = loss, lr, 0
        self.weights = {name: value.astype(np.float32, copy=True) for name, value in start.items()}
        self.m = {name: np.zeros_like(value) for name, value in self.weights.items()}
        self.v = {name: np.zeros_like(value) for name, value in self.weights.items()}

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        loss, gradients = self.loss(x, labels, self.weights)
        self.t += 1
        (b1, b2), t = BETAS, self.t
        step_size, root_c2 = np.float32(self.lr / (1 - b1**t)), np.float32(np.sqrt(1 - b2**t))
        for name, g in gradients.items():
            m, v = self.m[name], self.v[name]
            m *= np.float32(b1)
            m += np.float32(1 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g
            self.weights[name] -= step_size * m / (np.sqrt(v) / root_c2 + np.float32(EPS))
        return loss

    def read(self, name: str) -> np.ndarray:
        return self.weights[name]

    def write(self, name: str, value: np.ndarray) -> None:
        self.weights[name] = value


@contextlib.contextmanager
def _quiet_stderr():
    """Send fd 2 to /dev/null: generate_artifacts' native logger prints ~20 INFO lines there whatever
    the default severity. Failures still arrive as exceptions with their message."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _artifacts(model: onnx.ModelProto, trainable: list[str], folder: Path) -> None:
    """Training, eval, checkpoint and optimizer files for cross-entropy + torch-style Adam."""
    artifacts, _, onnxblock = training_modules()
    try:
        with _quiet_stderr():
            artifacts.generate_artifacts(
                model,
                requires_grad=trainable,
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=onnxblock.optim.AdamW(betas=BETAS, eps=EPS, weight_decay=0.0),
                artifact_directory=folder,
            )
    except RuntimeError as exc:  # e.g. "The gradient builder has not been registered: <Op> for node <name>"
        reason = re.split(r"was false\. |\] : \d+ : \w+ : ", str(exc).strip().splitlines()[-1])[-1]
        raise InputError(f"onnxruntime-training cannot differentiate this model: {reason} "
                         "(try the adjoint engine: --engine adjoint)") from exc
    path = folder / "optimizer_model.onnx"
    optimizer = onnx.load(path)
    optimizer.ir_version = min(optimizer.ir_version, 10)  # written at IR 14 by onnx >= 1.18
    for node in optimizer.graph.node:
        for attribute in node.attribute:
            if node.op_type == "AdamWOptimizer" and attribute.name == "adam_mode":
                attribute.i = 0  # torch's update, not HuggingFace's
    onnx.save(optimizer, path)


class OrtTrainer:
    """onnxruntime-training's Module and Optimizer on artifacts written to ``folder``; PRelu is
    spelled in ops that have a gradient there, and the copy is at opset 12 or later, where its
    loss block's SoftmaxCrossEntropyLoss exists."""

    def __init__(self, logits_model: onnx.ModelProto, trainable: list[str], lr: float, threads: int | None, folder: Path):
        model = copied(logits_model, [UpgradeOpset(12)])
        nodes = [n for node in model.graph.node for n in differentiable_nodes(node)]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _artifacts(model, trainable, folder)
        _, api, _ = training_modules()
        self.state = api.CheckpointState.load_checkpoint(folder / "checkpoint")
        self.module = api.Module(folder / "training_model.onnx", self.state, session_options=session_options(threads))
        self.optimizer = api.Optimizer(folder / "optimizer_model.onnx", self.module)
        self.optimizer.set_learning_rate(lr)
        self.module.train()

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        loss = float(self.module(x, labels))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return loss

    def read(self, name: str) -> np.ndarray:
        return self.state.parameters[name].data

    def write(self, name: str, value: np.ndarray) -> None:
        self.state.parameters[name] = value
