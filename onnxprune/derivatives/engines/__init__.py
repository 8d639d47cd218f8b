"""The gradient engines behind one interface, and the choice between them.

``output_jacobians`` and ``loss_gradients`` return an object whose ``rows``/``squares`` (or call)
give per-sample derivatives at the layers' pre-activations (see ``base``). The engine named by
``engine`` ('auto', 'adjoint', 'ort-training') is tried first; when it cannot differentiate the
model and the other one is installed, the other one runs instead. ``choice`` says which ran and why.
"""
from __future__ import annotations

import numpy as np

from onnxprune.derivatives.engines.base import ENGINES, EngineChoice, EngineFailure, candidates

__all__ = ["ENGINES", "EngineChoice", "EngineFailure", "output_jacobians", "loss_gradients"]


def _implementation(name: str, kind: str):
    from importlib import import_module

    return getattr(import_module(f".{'adjoint' if name == 'adjoint' else 'ort_training'}", __name__), kind)


class _Chosen:
    """Builds the first engine that can differentiate the model, on the first batch it sees."""

    def __init__(self, kind: str, engine: str, args: tuple, kwargs: dict):
        self._todo = candidates(engine)
        self._kind, self._args, self._kwargs = kind, args, kwargs
        self._failures: list[str] = []
        self._next()

    def _next(self) -> None:
        self.choice: EngineChoice = self._todo.pop(0)
        self.impl = _implementation(self.choice.name, self._kind)(*self._args, **self._kwargs)

    def _call(self, method: str, *args):
        while True:
            try:
                return getattr(self.impl, method)(*args)
            except EngineFailure as exc:
                self._failures.append(str(exc))
                if not self._todo:  # the model runs (checked before): the limitation is ours, not the input's
                    from onnxprune.errors import Limitation

                    raise Limitation("no gradient engine can differentiate the model: " + "; ".join(self._failures)) from None
                self._next()
                self.choice = EngineChoice(self.choice.name, f"fallback: {self._failures[-1]}")

    def __getattr__(self, name):  # repeats, scale, exact, shapes, ... of the engine that runs
        return getattr(self.impl, name)


class _OutputJacobians(_Chosen):
    def reseed(self, seed) -> None:
        """Random probes from here on drawn from ``seed`` (an int or a sequence of ints), also by an engine
        that a fallback builds later: a shard's probes then depend on the shard alone."""
        self._kwargs["seed"] = seed
        self.impl.rng = np.random.default_rng(seed)

    def rows(self, feeds, output_shape):
        return self._call("rows", feeds, output_shape)

    def squares(self, feeds, output_shape):
        return self._call("squares", feeds, output_shape)

    def __call__(self, feeds, output_shape):
        """Per-sample G for every layer and the layer inputs z: (batch, out) and (batch, in) for a
        2-D layer; (batch, out, positions) and z as the graph has it for a shared-weight layer."""
        rows, inputs = self.rows(feeds, output_shape)
        jac = {}
        for name, g in rows.items():
            g = g.astype(np.float64)
            big_g = np.einsum("srot,srot->sot", g, g) * self.scale
            jac[name] = big_g[:, :, 0] if big_g.shape[2] == 1 else big_g
        shared = {layer.name for layer in self.layers if layer.shared}
        return jac, {name: z if name in shared else z.reshape(len(z), -1) for name, z in inputs.items()}


class _LossGradients(_Chosen):
    def __call__(self, feeds, labels):
        return self._call("__call__", feeds, labels)


def output_jacobians(model, layers, output, output_size, *, probes=None, seed=0, provider="cpu", threads=None,
                     engine: str = "auto") -> _OutputJacobians:
    """Per-sample output derivatives at ``layers``' pre-activations (exact, or ``probes`` random seeds)."""
    return _OutputJacobians("OutputJacobians", engine, (model, layers, output, output_size),
                            dict(probes=probes, seed=seed, provider=provider, threads=threads))


def loss_gradients(model, layers, output, *, provider="cpu", threads=None, engine: str = "auto") -> _LossGradients:
    """Per-sample cross-entropy gradients at ``layers``' pre-activations."""
    return _LossGradients("LossGradients", engine, (model, layers, output), dict(provider=provider, threads=threads))
