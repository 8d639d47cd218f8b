"""What a gradient engine is, and which one runs.

An engine gives, for a batch of calibration samples, the per-sample derivatives of the protected
output at every layer's pre-activation (``rows``), their squared sums over the probes for layers
whose weight is used once (``squares``: G = sum_k (dy_k/da)^2, what the ECP statistics need), and
per-sample loss gradients (gradmag). Two implementations exist: ``adjoint`` (onnx-ad derivative
graphs, any onnxruntime build) and ``ort-training`` (onnxruntime-training's gradient builder, the
training build only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENGINES = ("auto", "adjoint", "ort-training")


def rademacher(rng, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random signs +-1 of ``shape``: the probes' seeds (ten times faster than choosing among [-1, 1],
    which mattered at a language model's tokens x vocabulary per sample)."""
    return (rng.integers(0, 2, size=shape, dtype=np.int8) * np.int8(2) - np.int8(1)).astype(dtype)


class EngineFailure(Exception):
    """This engine cannot differentiate the model (an op without a rule, a graph it cannot build or
    its runtime cannot run); another engine may."""


@dataclass(frozen=True)
class EngineChoice:
    """The engine that computed the derivatives, and why it was the one."""

    name: str
    reason: str

    def as_json(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def training_build() -> bool:
    """The installed onnxruntime is the training build (it has the native gradient builder)."""
    from onnxruntime.capi import _pybind_state

    return hasattr(_pybind_state, "GradientGraphBuilder")


def candidates(engine: str) -> list[EngineChoice]:
    """The engines to try for ``engine`` ('auto', 'adjoint' or 'ort-training'), in order, each with
    the reason it is tried; later ones are fallbacks for an op the earlier ones cannot differentiate."""
    from onnxprune.errors import RuntimeUnavailable

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    training = training_build()
    if engine == "ort-training" and not training:
        raise RuntimeUnavailable(
            "engine 'ort-training' needs the onnxruntime training build, which is not installed; use "
            "--engine adjoint (any onnxruntime), or install onnxprune[training] in a fresh environment")
    if engine == "adjoint":
        first = EngineChoice("adjoint", "requested (--engine adjoint)")
    elif engine == "ort-training":
        first = EngineChoice("ort-training", "requested (--engine ort-training)")
    elif training:
        first = EngineChoice("ort-training", "auto: the installed onnxruntime is the training build")
    else:
        first = EngineChoice("adjoint", "auto: the installed onnxruntime has no gradient builder; onnx-ad's "
                                        "derivative graphs run on any build")
    other = "ort-training" if first.name == "adjoint" else "adjoint"
    if other == "ort-training" and not training:
        return [first]
    return [first, EngineChoice(other, f"fallback: {first.name} cannot differentiate this model")]
