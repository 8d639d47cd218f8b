"""One small scorer per pruning method; each turns what it needs (``context.ScoringContext``) into per-weight scores.

A scorer returns, for every layer, ``scores`` (out, in) where low means "prune first" and, when the
method compensates, ``shifts`` (out, in): the pre-activation shift Delta a_i that removing W_ij
calls for. Adding a method means adding one class and registering its name in ``METHODS``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.errors import InputError
from onnxprune.score.context import ScoringContext


@dataclass
class Saliency:
    scores: np.ndarray
    shifts: np.ndarray | None = None


INVISIBLE_BIAS = 1e-6  # C_i below this fraction of its cross-term-free scale: the output cannot see b_i


class ECP:
    """Elimination-compensation: I_ij = W_ij^2 (A_ij - B_ij^2 / C_i), Delta b_ij = W_ij B_ij / C_i.

    The output error left after removing W_ij and optimally shifting b_i, to first order in the
    output (never the loss); rows whose derivatives are zero at every position do not reach the
    output and score 0. A row whose bias the output cannot see (a key projection before a softmax:
    the same shift of every key cancels, so C_i is float rounding, ~1e-14 of what the positions
    alone give) gets no shift and the uncompensated error W_ij^2 A_ij: dividing by C_i there would
    write shifts of 1e5 and rank the row's weights as free. With ``error_at="layer"`` G is 1: the
    error is the layer's own output's (the per-layer reconstruction target SparseGPT and Wanda use),
    A - B^2/C = Var z, from forward passes alone.
    """

    name = "ecp"

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        if ctx.error_at == "layer":  # G = 1: each layer's own output error, from forward passes alone
            return Variance()(ctx)
        out = {}
        for layer in ctx.layers:
            s, w = ctx.statistics()[layer.name], ctx.weights[layer.name]
            c, scale = s.C[:, None], s.C_positions[:, None]
            visible = c > INVISIBLE_BIAS * scale
            reached = scale > 0
            ratio = np.where(visible, s.B / np.where(visible, c, 1.0), 0.0)
            residual = np.maximum(s.A - s.B * ratio, 0.0)
            out[layer.name] = Saliency(w * w * np.where(reached, residual, 0.0), w * ratio)
        return out


class Variance:
    """Mean compensation (FLAP / bias correction): I = W^2 Var(z_j), Delta b = W_ij E[z_j]: ECP with G = 1."""

    name = "variance"

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        out = {}
        for layer in ctx.layers:
            s, w = ctx.moments()[layer.name], ctx.weights[layer.name]
            out[layer.name] = Saliency(w * w * np.broadcast_to(s.var_z, w.shape), w * np.broadcast_to(s.mean_z, w.shape))
        return out


class Magnitude:
    """|W_ij| (of the effective weight, alpha included)."""

    name = "magnitude"

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        return {layer.name: Saliency(np.abs(ctx.weights[layer.name])) for layer in ctx.layers}


class Random:
    """Uniform random scores from the seeded generator."""

    name = "random"

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        rng = np.random.default_rng(ctx.seed)
        return {layer.name: Saliency(rng.random((layer.out_features, layer.in_features))) for layer in ctx.layers}


class GradMag:
    """|W_ij dL/dW_ij| with L the mean cross-entropy on the calibration labels."""

    name = "gradmag"

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        grads = ctx.loss_gradients()
        return {layer.name: Saliency(np.abs(ctx.weights[layer.name] * grads[layer.name])) for layer in ctx.layers}


class Nonlinear:
    """Brute force: remove each weight, compensate with W_ij E[z_j], measure E||Delta y||^2 exactly.

    Removing W_ij shifts a_i by -W_ij (z_j - E[z_j]); we push that through the rest of the network
    (the graph from a_i to the output) for every weight and sample: |W| x n forward passes of the
    tail. Uses the first ``max_samples`` calibration samples; refuses models above ``max_weights``
    weights unless forced.
    """

    name = "nonlinear"
    max_weights = 250_000
    max_samples = 512

    def __call__(self, ctx: ScoringContext) -> dict[str, Saliency]:
        total = sum(layer.size for layer in ctx.layers)
        shared = [layer.name for layer in ctx.layers if layer.shared]
        if shared:
            raise InputError(f"method nonlinear supports 2-D Gemm/MatMul layers only; {shared[0]} shares its "
                             "weight across positions (Conv or MatMul on sequences)")
        if total > self.max_weights and not ctx.force:
            raise InputError(f"method nonlinear needs |W| x n forward passes; {total} weights exceed its limit of "
                             f"{self.max_weights} (pass --force to run it anyway)")
        start = time.perf_counter()
        data = ctx.data.subset(self.max_samples)
        names = [layer.preact for layer in ctx.layers] + [ctx.output]
        inputs = {layer.name: layer.input for layer in ctx.layers}
        wanted = [n for n in dict.fromkeys(list(inputs.values()) + names) if n not in data.feeds]
        feeds = data.arrays()  # brute force: every sample at once
        values = dict(zip(wanted, runtime.run_tensors(ctx.model, feeds, wanted, ctx.provider)))
        values.update(feeds)
        base = values[ctx.output].reshape(len(data), -1).astype(np.float64)
        out = {}
        done, report = 0, ctx._report("brute force")
        for layer in ctx.layers:
            w = ctx.weights[layer.name]
            z = values[layer.input].reshape(len(data), -1).astype(np.float64)
            mean = z.mean(0)
            tail = _Tail(ctx.model, layer.preact, ctx.output, data.feeds, ctx.provider, ctx.threads)
            pre = values[layer.preact]
            err = np.empty_like(w)
            chunk = max(1, 65536 // len(data))
            for i in range(layer.out_features):
                for j0 in range(0, layer.in_features, chunk):
                    j = np.arange(j0, min(j0 + chunk, layer.in_features))
                    delta = -w[i, j][:, None] * (z[:, j].T - mean[j][:, None])  # (chunk, n)
                    moved = np.repeat(pre[None], len(j), axis=0)               # (chunk, n, out)
                    moved[:, :, i] += delta.astype(pre.dtype)
                    y = tail(moved.reshape((-1,) + pre.shape[1:]), len(j)).reshape(len(j), len(data), -1)
                    err[i, j] = ((y - base[None]) ** 2).sum(2).mean(1)
                done += layer.in_features
                if report:
                    report(done, total)
            out[layer.name] = Saliency(err, w * mean[None, :])
        ctx.timings["brute force"] = time.perf_counter() - start
        return out


class _Tail:
    """The graph from one pre-activation to the protected output, run on modified pre-activations.

    Other inputs the tail needs (skip connections from the graph inputs) are tiled alongside.
    """

    def __init__(self, model, preact, output, feeds, provider, threads):
        self.preact, self.output, self.session, self.others = preact, output, None, {}
        if preact == output:  # the protected output itself: the tail is the identity
            return
        inferred = onnx.shape_inference.infer_shapes(runtime.runtime_copy(model))
        extracted = onnx.utils.Extractor(inferred).extract_model([preact, *feeds], [output])
        self.session = runtime.make_session(extracted, provider, threads)
        needed = {i.name for i in self.session.get_inputs()}
        self.others = {k: v for k, v in feeds.items() if k in needed and k != preact}

    def __call__(self, moved: np.ndarray, repeats: int) -> np.ndarray:
        if self.session is None:
            return moved.astype(np.float64)
        feeds = {self.preact: moved}
        feeds.update({k: np.tile(v, (repeats,) + (1,) * (v.ndim - 1)) for k, v in self.others.items()})
        return self.session.run([self.output], feeds)[0].astype(np.float64)


METHODS: dict[str, type] = {cls.name: cls for cls in (ECP, Magnitude, Random, GradMag, Variance, Nonlinear)}


def make_scorer(method: str):
    try:
        return METHODS[method]()
    except KeyError:
        names = ", ".join(METHODS)
        raise InputError(f"unknown method {method!r}; choose one of {names}") from None
