"""Fine-tune an ONNX classifier without torch: mean softmax cross-entropy + Adam, on one of two
gradient engines.

- ``adjoint``: the trainable weights are lifted to graph inputs, the loss is appended to the
  logits, and onnx-ad turns that into its reverse-mode graph (loss and weight gradients in one
  plain inference session, so it runs on any onnxruntime build); Adam steps in numpy.
- ``ort-training``: onnxruntime-training's artifacts (training, eval, checkpoint and optimizer
  graphs) driven by its api.Module/Optimizer. ORT's AdamW block is used with PyTorch's Adam
  settings: it defaults to eps 1e-6 and to ``adam_mode=1`` (HuggingFace: bias correction folded
  into the learning rate, eps not corrected); we set eps 1e-8, weight_decay 0 and ``adam_mode=0``.

Both take torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no weight decay), so the same
seed gives the same training on either engine up to float32 rounding. Pruned weights stay exactly
zero: their masks are re-applied to the parameters after every optimizer step. Adam is
element-wise and has no weight decay here, so the kept weights follow the same path as when the
mask multiplies the weight inside the graph, and this way needs no graph surgery. The two back ends
are ``onnxprune.repair.trainers``; this module checks the data and masks and runs the epochs.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.derivatives.engines.base import candidates
from onnxprune.errors import InputError
from onnxprune.find.layers import analyse_graph
from onnxprune.find.outputs import protected_output
from onnxprune.graph.index import read_initializer
from onnxprune.graph.passes import KeepNeeded, runtime_copy
from onnxprune.repair.trainers import AdjointLoss, AdjointTrainer, OrtTrainer, model_input
from onnxprune.runtime import make_session

# Initializer inputs that carry state, not parameters: no gradient flows to them.
_NOT_TRAINABLE_INPUTS = {"BatchNormalization": (3, 4)}

Progress = Callable[[int, int, int, float], None]


def choose_engine(engine: str = "auto") -> dict:
    """{"name", "reason"} of the gradient engine ``engine`` resolves to on this installation.

    ``auto`` takes onnxruntime-training when the installed onnxruntime is the training build
    (the user chose it), the adjoint engine otherwise; ``ort-training`` without the training
    build is a RuntimeUnavailable naming the fix.
    """
    try:
        return candidates(engine)[0].as_json()  # the statistics' rule (onnxprune.derivatives.engines.base)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers of rank >= 1 consumed by a node as a parameter (weights, biases, slopes).

    Scalars and integer initializers are constants of the graph (shapes, axes) and stay frozen.
    """
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1}
    used: set[str] = set()
    for node in model.graph.node:
        skip = _NOT_TRAINABLE_INPUTS.get(node.op_type, ())
        used.update(name for i, name in enumerate(node.input) if name in floats and i not in skip)
    return [t.name for t in model.graph.initializer if t.name in used]


def zero_masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Keep-masks of an already pruned model: its prunable weights that are exactly zero stay zero.

    Fine-tuning after pruning keeps the mask pruning chose, so it is read back from the zeros the
    pruned model carries; layers without a zero get no mask (nothing to hold, no cost per step).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)  # analyse_graph names unnamed nodes in place
    masks = {}
    for layer in analyse_graph(work).layers:
        weight = read_initializer(work, layer.weight)
        if not weight.all():
            masks[layer.weight] = weight != 0
    return masks


def _logits_copy(model: onnx.ModelProto, logits: str) -> onnx.ModelProto:
    """A runtime-stamped copy whose only output is ``logits``, without the nodes after it."""
    copy = runtime_copy(model)
    del copy.graph.output[:]
    copy.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", "classes"]))
    KeepNeeded({logits}, initializers=True)(copy)
    return copy


def _check_data(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> None:
    """x must match the model input's dtype and fixed dims; y must be one integer label per sample."""
    value = model_input(model)
    expected = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    if not isinstance(x, np.ndarray) or x.dtype != expected:
        raise InputError(f"x must be a numpy array of {expected} for input {value.name!r}, got {getattr(x, 'dtype', type(x))}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim] or [None] * x.ndim
    if x.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], x.shape[1:])):
        shown = ["N" if d is None else d for d in dims]
        raise InputError(f"x has shape {x.shape}, the model input {value.name!r} expects {shown}")
    if dims[0] is not None:
        raise InputError(f"model input {value.name!r} has a fixed batch size {dims[0]}; fine-tuning needs a free one")
    if not isinstance(y, np.ndarray) or y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be a numpy array of integers, got {getattr(y, 'dtype', type(y))}")
    if y.shape != (len(x),) or len(x) == 0:
        raise InputError(f"need one label per sample and at least one sample: x has {len(x)} rows, y has shape {y.shape}")


def _check_masks(masks: dict[str, np.ndarray], model: onnx.ModelProto, trainable: list[str]) -> None:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for name, mask in masks.items():
        if name not in trainable:
            raise InputError(f"mask for {name!r}, which is not a trainable float initializer of the model")
        if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != shapes[name]:
            raise InputError(f"mask for {name!r} must be a boolean array of shape {shapes[name]}")


def finetune(
    model: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    masks: dict[str, np.ndarray] | None = None,
    output: str | None = None,
    progress: Progress | None = None,
    threads: int = 1,
    engine: str = "auto",
) -> tuple[onnx.ModelProto, list[dict]]:
    """Train the float parameters of ``model`` on (x, y); return a copy with the trained values.

    The returned model keeps the input's graph, names, stamping and metadata; only initializer
    values change. ``masks`` maps initializer names to boolean keep-masks whose False entries are
    zero before, during and after training. History: one dict {epoch, loss, seconds} per epoch,
    loss being the mean training cross-entropy over the epoch's batches (weighted by batch size).
    ``engine``: "auto", "adjoint" or "ort-training" (see ``choose_engine``). Same seed, engine and
    ``threads`` give identical weights on a given CPU; the thread count changes the float
    summation order (1e-8 differences), so it is pinned, and one thread is as fast as two for
    MLPs of this size.
    """
    chosen = choose_engine(engine)["name"]
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise InputError(f"need epochs >= 0, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    masks = masks or {}
    _check_data(model, x, y)
    logits = protected_output(model, output)
    training = _logits_copy(model, logits)
    trainable = trainable_names(training)
    if not trainable:
        raise InputError("the model has no float initializers to train")
    _check_masks(masks, model, trainable_names(model))
    untrained = {name: mask for name, mask in masks.items() if name not in trainable}  # not before the logits: zeroed only
    masks = {name: mask for name, mask in masks.items() if name in trainable}
    probe = make_session(training).run(None, {model_input(training).name: x[:1]})[0]
    if probe.ndim != 2 or probe.dtype != np.float32:
        raise InputError(f"logits {logits!r} must be float32 of shape (N, classes), got {probe.dtype} {probe.shape}")
    classes = probe.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise InputError(f"labels must lie in [0, {classes}) for {classes} classes, got [{y.min()}, {y.max()}]")
    labels = y.astype(np.int64)

    start = {t.name: numpy_helper.to_array(t) for t in training.graph.initializer if t.name in trainable}
    history = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-finetune-") as tmp:
        trainer: AdjointTrainer | OrtTrainer
        if chosen == "adjoint":
            graph = AdjointLoss(training, trainable, min(batch_size, len(x)), x.shape[1:], classes, threads)
            trainer = AdjointTrainer(graph, start, lr)
        else:
            trainer = OrtTrainer(training, trainable, lr, threads, Path(tmp))
        for name, mask in masks.items():
            trainer.write(name, np.where(mask, start[name], np.float32(0)))
        rng = np.random.default_rng(seed)
        n_batches = -(-len(x) // batch_size)
        for epoch in range(1, epochs + 1):
            began, total, seen = time.perf_counter(), 0.0, 0
            order = rng.permutation(len(x))
            for batch in range(n_batches):
                rows = order[batch * batch_size:(batch + 1) * batch_size]
                loss = trainer.step(x[rows], labels[rows])
                for name, mask in masks.items():
                    trainer.write(name, np.where(mask, trainer.read(name), np.float32(0)))
                total, seen = total + loss * len(rows), seen + len(rows)
                if progress is not None:
                    progress(epoch, batch + 1, n_batches, total / seen)
            history.append({"epoch": epoch, "loss": total / seen, "seconds": time.perf_counter() - began})
        trained = {name: trainer.read(name).copy() for name in trainable}
    trained.update({name: np.where(mask, read_initializer(model, name), np.float32(0)) for name, mask in untrained.items()})

    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in trained:
            tensor.ClearField("float_data")
            tensor.raw_data = trained[tensor.name].astype("<f4").tobytes()
    return result, history
