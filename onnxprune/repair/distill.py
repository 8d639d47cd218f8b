"""Label-free distillation: the final repair of ``ecp-refit``. The dense model's outputs on the
calibration data are the targets; the masks stay fixed; Adam runs on the free entries of every
layer's weights and biases, through onnx-ad's reverse graph of the squared output error (any
onnxruntime), and the epoch with the least held-out error is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.derivatives.plan import protected
from onnxprune.find.layers import Layer
from onnxprune.graph.index import tensor_types
from onnxprune.io.data import Dataset
from onnxprune.repair.base import LayerRefit, parametric, refit_problem
from onnxprune.repair.lstsq import HOLDOUT_EVERY


class _DistillRun:
    def __init__(self, spec: Distill, dense, data: Dataset, output: str, provider, threads, batch_size, objective=None):
        self.spec, self.dense, self.data, self.output, self.objective = spec, dense, data, output, objective
        self.provider, self.threads, self.batch_size = provider, threads, batch_size
        self.feeds = {k: np.asarray(v) for k, v in data.feeds.items()}  # an .npz's columns are read once, here

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool, rows=None):
        if not (final or self.spec.every_step):
            return current, []
        layers = [layer for layer in layers if refit_problem(layer) is None]
        names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        inits = {t.name: t for t in current.graph.initializer}
        if not names or any(inits[n].data_type != onnx.TensorProto.FLOAT for n in names):
            return current, [LayerRefit(layer.name, skipped="distillation needs float32 weights") for layer in layers]
        target, name = protected(self.dense, self.output, self.objective)  # every protected output, relative
        (dense_y,) = runtime.tensor_session(target, [name], self.provider, self.threads).run([name], self.feeds)
        try:
            session = self._session(current, names, dense_y.shape[1:])
        except Exception as exc:  # onnx-ad refuses an op or a shape: keep the refit's model
            reason = f"distillation unavailable: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
            return current, [LayerRefit(layer.name, skipped=reason) for layer in layers]
        n = len(dense_y)
        held = np.arange(n) % HOLDOUT_EVERY == 0
        fit_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
        values = {k: numpy_helper.to_array(inits[k]).astype(np.float32) for k in names}
        # Adam runs on one flat vector of what may move: the kept weights and the biases
        free = {k: values[k] != 0 if k in {layer.weight for layer in layers} else np.ones(values[k].shape, bool)
                for k in names}
        seed = np.ones(1, np.float32)

        def run(theta, rows, grads):
            feeds = {k: v[rows] for k, v in self.feeds.items()}
            feeds.update(unflat(theta))
            feeds.update({DISTILL_TARGET: dense_y[rows], f"adj_{DISTILL_LOSS}": seed})
            wanted = [DISTILL_LOSS] + ([f"adj_{k}" for k in names] if grads else [])
            return session.run(wanted, feeds)

        def unflat(theta):
            out, at = {}, 0
            for k in names:
                v = np.zeros(values[k].shape, np.float32)
                count = int(free[k].sum())
                v[free[k]] = theta[at:at + count]
                out[k], at = v, at + count
            return out

        def held_error(theta):
            return sum(float(run(theta, held_rows[i:i + self.batch_size], False)[0])
                       for i in range(0, len(held_rows), self.batch_size)) / max(len(held_rows), 1)

        rng = np.random.default_rng(self.spec.seed)
        theta = np.concatenate([values[k][free[k]] for k in names]).astype(np.float64)
        moment, second = np.zeros_like(theta), np.zeros_like(theta)
        best_error, best, best_epoch = held_error(theta.astype(np.float32)), theta.astype(np.float32), 0
        start_error, t = best_error, 0
        self.curve = [start_error]  # held-out error after every epoch (the first: before any)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for epoch in range(1, self.spec.epochs + 1):
            order = rng.permutation(fit_rows)
            for i in range(0, len(order), self.spec.batch):
                rows = np.sort(order[i:i + self.spec.batch])
                grads = run(theta.astype(np.float32), rows, True)[1:]
                g = np.concatenate([grad.reshape(values[k].shape)[free[k]] for k, grad in zip(names, grads)])
                g = g.astype(np.float64) / len(rows)
                t += 1
                moment = b1 * moment + (1 - b1) * g
                second = b2 * second + (1 - b2) * g * g
                theta = theta - self.spec.lr * (moment / (1 - b1**t)) / (np.sqrt(second / (1 - b2**t)) + eps)
            candidate = theta.astype(np.float32)
            error = held_error(candidate)
            self.curve.append(error)
            if error < best_error:
                best_error, best, best_epoch = error, candidate, epoch
            elif self.spec.patience and epoch - best_epoch >= self.spec.patience:
                break
        self.epochs_run = epoch if self.spec.epochs else 0
        best = unflat(best)
        model = onnx.ModelProto()
        model.CopyFrom(current)
        for t_ in model.graph.initializer:
            if t_.name in best:
                t_.CopyFrom(numpy_helper.from_array(best[t_.name], t_.name))
        report = [LayerRefit(layer.name, heldout_error_before=start_error, heldout_error_after=best_error,
                             skipped=None if best_epoch else "distillation did not lower the held-out error")
                  for layer in layers]
        self.epochs_kept = best_epoch
        return model, report

    def _session(self, model: onnx.ModelProto, names: list[str], shape: tuple[int, ...]):
        """The loss sum ||y - T||^2 of the network with ``names`` as inputs, and its gradients."""
        from onnx_ad import reverse

        m, name = protected(parametric(runtime.runtime_copy(model), names), self.output, self.objective)
        graph = m.graph
        for vi in graph.input:  # reverse mode needs declared shapes (Conv, Slice): the data's per sample
            if vi.name in self.feeds:
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                                          ["N", *self.feeds[vi.name].shape[1:]]))
        elem = tensor_types(m).get(name, onnx.TensorProto.FLOAT)
        graph.input.append(helper.make_tensor_value_info(DISTILL_TARGET, onnx.TensorProto.FLOAT, ["N", *shape]))
        graph.node.extend([helper.make_node("Sub", [name, DISTILL_TARGET], [f"{DISTILL_LOSS}__d"]),
                           helper.make_node("Mul", [f"{DISTILL_LOSS}__d"] * 2, [f"{DISTILL_LOSS}__dd"]),
                           helper.make_node("ReduceSum", [f"{DISTILL_LOSS}__dd"], [DISTILL_LOSS], keepdims=0)])
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(DISTILL_LOSS, elem, []))
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        return runtime.make_session(reverse(inferred, inputs=names, outputs=[DISTILL_LOSS], layout="onnx"),
                                    self.provider, self.threads)


DISTILL_TARGET = "onnxprune__distill_target"
DISTILL_LOSS = "onnxprune__distill_loss"


@dataclass(frozen=True)
class Distill:
    """Label-free distillation at the final step, masks fixed: Adam on the layers' surviving
    weights and biases towards the dense model's protected output on the calibration data (mean
    squared difference), gradients from onnx-ad's reverse-mode graph (any onnxruntime). Trained on
    four fifths of the samples; the epoch with the least error on the held-out fifth is kept, the
    model as it came when none lowers it; with ``patience`` the training stops that many epochs
    after the best one."""

    epochs: int = 30
    lr: float = 1e-3
    patience: int | None = None  # stop after this many epochs without a lower held-out error
    batch: int = 128
    seed: int = 0
    every_step: bool = False  # also after the refits of the steps before the last
    name = "distill"

    def start(self, dense, layers, data, output, *, batch_size=256, provider="cpu", threads=None, objective=None,
              **_) -> _DistillRun:
        return _DistillRun(self, dense, data, output, provider, threads, batch_size, objective)
