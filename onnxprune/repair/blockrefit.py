"""Block-wise Gauss-Newton refit: two layers and the activation between them, fit together.

Refitting one matrix at a time cannot undo what the nonlinearity between two layers does to the
first one's error; fitting the window y = W2 s(W1 x + b1) + b2 can (arXiv 2510.14444). For every
pair of consecutive dense layers joined by one elementwise activation, in graph order (sliding
windows: the second layer of a window is the first of the next), the kept weights and both biases
are moved by a few damped Gauss-Newton (Levenberg-Marquardt) steps towards the dense model's
output of the block (the second layer's pre-activation with its bias) on the calibration inputs
the pruned network itself produces (label-free, chained). Masks are fixed: pruned weights stay
exactly zero. Each step solves (J'J + lambda diag J'J) d = -J'r by preconditioned conjugate
gradients from Jacobian-vector products in numpy (J is never formed); the first layer's products
run over its kept entries only. Four fifths of the samples fit; of the iterates, the one with the
least error on the held-out fifth is kept (the window as it came when none lowers it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.find.layers import Layer, analyse_graph
from onnxprune.graph.index import consumers, producers, read_initializer
from onnxprune.io.data import Dataset
from onnxprune.repair.base import LayerRefit, fit_target, position_rows, refit_problem, write_layer
from onnxprune.repair.lstsq import HOLDOUT_EVERY

GATHER_BYTES = 256 * 2**20  # the first layer's inputs gathered per kept entry up to this size, else dense products


# ---------------------------------------------------------------------------------------------
# Activations: forward and derivative in numpy

@dataclass(frozen=True)
class Activation:
    op: str
    slope: np.ndarray | float = 0.0  # PRelu's slope (per unit) or LeakyRelu's alpha

    def __call__(self, u: np.ndarray) -> np.ndarray:
        if self.op in ("Relu", "PRelu", "LeakyRelu"):
            return np.where(u < 0, u * self.slope, u)
        if self.op == "Tanh":
            return np.tanh(u)
        return 1.0 / (1.0 + np.exp(-u))  # Sigmoid

    def derivative(self, u: np.ndarray) -> np.ndarray:
        if self.op in ("Relu", "PRelu", "LeakyRelu"):
            return np.where(u < 0, self.slope, 1.0) * np.ones_like(u)
        if self.op == "Tanh":
            return 1.0 - np.tanh(u) ** 2
        s = 1.0 / (1.0 + np.exp(-u))
        return s * (1.0 - s)


ACTIVATIONS = ("Relu", "PRelu", "LeakyRelu", "Tanh", "Sigmoid")


def activation_of(model: onnx.ModelProto, node: onnx.NodeProto, units: int) -> Activation | str:
    """The numpy form of ``node`` acting on ``units`` features, or why there is none."""
    if node.op_type not in ACTIVATIONS:
        return f"{node.op_type} between the layers is not one of {', '.join(ACTIVATIONS)}"
    if node.op_type == "Relu":
        return Activation("Relu", 0.0)
    if node.op_type == "LeakyRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
        return Activation("LeakyRelu", float(alpha))
    if node.op_type == "PRelu":
        try:
            slope = np.asarray(read_initializer(model, node.input[1]), np.float64).reshape(-1)
        except Exception:  # noqa: BLE001 - a slope computed in the graph
            return "PRelu's slope is not an initializer"
        if slope.size not in (1, units):
            return f"PRelu's slope has {slope.size} values for {units} units"
        return Activation("PRelu", slope if slope.size == units else float(slope[0]))
    return Activation(node.op_type)


@dataclass
class Block:
    first: Layer
    second: Layer
    activation: Activation


def find_blocks(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[Block], list[LayerRefit]]:
    """Consecutive pairs of ``layers`` joined by one activation (first.preact -> act -> second.input),
    and a LayerRefit saying why for every layer in no block."""
    producer_of, consumers_of = producers(model.graph), consumers(model.graph)
    blocks: list[Block] = []
    reasons: dict[str, str] = {}
    for first, second in zip(layers, layers[1:]):
        act = producer_of.get(second.input)
        why = refit_problem(first) or refit_problem(second)
        if not why and (first.shared or second.shared):
            why = "only dense (one position per sample) layers form blocks"
        elif not why and (act is None or act.input[0] != first.preact):
            why = f"{second.name}'s input is not one activation of {first.name}'s pre-activation"
        elif not why and len(consumers_of.get(first.preact, [])) != 1:
            why = f"{first.name}'s pre-activation has other consumers"
        if why:
            reasons.setdefault(f"{first.name}+{second.name}", why)
            continue
        assert act is not None  # a missing activation gave a reason above
        activation = activation_of(model, act, first.out_features)
        if isinstance(activation, str):
            reasons.setdefault(f"{first.name}+{second.name}", activation)
            continue
        blocks.append(Block(first, second, activation))
    covered = {layer.name for b in blocks for layer in (b.first, b.second)}
    skipped = [LayerRefit(layer.name, skipped="in no two-layer block: " + "; ".join(
        why for pair, why in reasons.items() if layer.name in pair.split("+"))) for layer in layers if layer.name not in covered]
    return blocks, skipped


# ---------------------------------------------------------------------------------------------
# The block as a least-squares problem in numpy

class BlockProblem:
    """r(theta) = W2 s(W1 x + b1) + b2 - t over the samples, theta = (kept W1, b1, kept W2, b2);
    residuals, J v, J' r and diag J'J by the chain rule (J never formed)."""

    def __init__(self, x: np.ndarray, t: np.ndarray, keep1: np.ndarray, keep2: np.ndarray, activation: Activation):
        self.x, self.t, self.act = np.asarray(x, np.float64), np.asarray(t, np.float64), activation
        self.keep1, self.keep2 = np.asarray(keep1, bool), np.asarray(keep2, bool)
        self.rows1, self.cols1 = np.nonzero(self.keep1)  # row-major: entries grouped by row
        self.bounds = np.searchsorted(self.rows1, np.arange(len(self.keep1) + 1))
        self.gathered = self.x.T[self.cols1] if 8 * len(self.cols1) * len(self.x) <= GATHER_BYTES else None
        self.sizes = (len(self.rows1), self.keep1.shape[0], int(self.keep2.sum()), self.keep2.shape[0])

    # theta <-> (W1, b1, W2, b2)
    def pack(self, w1, b1, w2, b2) -> np.ndarray:
        return np.concatenate([w1[self.keep1], b1, w2[self.keep2], b2]).astype(np.float64)

    def unpack(self, theta: np.ndarray):
        n1, m, n2, k = self.sizes
        w1, w2 = np.zeros(self.keep1.shape), np.zeros(self.keep2.shape)
        w1[self.keep1] = theta[:n1]
        w2[self.keep2] = theta[n1 + m:n1 + m + n2]
        return w1, theta[n1:n1 + m], w2, theta[n1 + m + n2:]

    def _first(self, v1: np.ndarray) -> np.ndarray:
        """x W1' for W1 given by its kept entries v1: (samples, m)."""
        if self.gathered is None:
            w = np.zeros(self.keep1.shape)
            w[self.keep1] = v1
            return self.x @ w.T
        out = np.empty((len(self.keep1), len(self.x)))
        for j in range(len(self.keep1)):
            s, e = self.bounds[j], self.bounds[j + 1]
            out[j] = v1[s:e] @ self.gathered[s:e]
        return out.T

    def _first_transposed(self, du: np.ndarray) -> np.ndarray:
        """sum_n du_nj x_ni at the kept entries (j, i)."""
        if self.gathered is None:
            return (du.T @ self.x)[self.keep1]
        out = np.empty(len(self.rows1))
        dut = np.ascontiguousarray(du.T)
        for j in range(len(self.keep1)):
            s, e = self.bounds[j], self.bounds[j + 1]
            out[s:e] = self.gathered[s:e] @ dut[j]
        return out

    def linearise(self, theta: np.ndarray) -> np.ndarray:
        """Remember u, s(u), s'(u) and W2 at theta; the residuals there."""
        n1, m, n2, k = self.sizes
        self.theta = theta
        self.w1, self.b1, self.w2, self.b2 = self.unpack(theta)
        self.u = self._first(theta[:n1]) + self.b1
        self.s, self.d = self.act(self.u), self.act.derivative(self.u)
        return self.s @ self.w2.T + self.b2 - self.t

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        n1 = self.sizes[0]
        w1, b1, w2, b2 = self.unpack(theta)
        return self.act(self._first(theta[:n1]) + b1) @ w2.T + b2 - self.t

    def loss(self, theta: np.ndarray) -> float:
        return float((self.residuals(theta) ** 2).sum())

    def jvp(self, v: np.ndarray) -> np.ndarray:
        n1, m, n2, k = self.sizes
        v1, c1, v2, c2 = self.unpack(v)
        du = self._first(v[:n1]) + c1
        return (self.d * du) @ self.w2.T + self.s @ v2.T + c2

    def vjp(self, r: np.ndarray) -> np.ndarray:
        du = (r @ self.w2) * self.d
        return np.concatenate([self._first_transposed(du), du.sum(0), (r.T @ self.s)[self.keep2], r.sum(0)])

    def diagonal(self) -> np.ndarray:
        """diag J'J at the linearisation point."""
        c = (self.w2 ** 2).sum(0)                                   # sum_k W2_kj^2
        d2 = self.d ** 2
        if self.gathered is None:
            g1 = ((d2.T @ self.x ** 2) * c[:, None])[self.keep1]
        else:
            g1 = np.empty(len(self.rows1))
            d2t = np.ascontiguousarray(d2.T)
            for j in range(len(self.keep1)):
                s, e = self.bounds[j], self.bounds[j + 1]
                g1[s:e] = c[j] * ((self.gathered[s:e] ** 2) @ d2t[j])
        s2 = np.broadcast_to((self.s ** 2).sum(0), self.keep2.shape)[self.keep2]
        return np.concatenate([g1, c * d2.sum(0), s2, np.full(self.keep2.shape[0], float(len(self.x)))])


def _conjugate_gradients(apply: Callable[[np.ndarray], np.ndarray], rhs: np.ndarray, precondition: np.ndarray,
                         iterations: int, tolerance: float = 1e-3) -> np.ndarray:
    """Solve apply(x) = rhs (symmetric positive definite), Jacobi-preconditioned."""
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / precondition
    p, rz = z.copy(), r @ z
    stop = tolerance * np.sqrt(rhs @ rhs)
    for _ in range(iterations):
        ap = apply(p)
        alpha = rz / max(p @ ap, 1e-300)
        x += alpha * p
        r -= alpha * ap
        if np.sqrt(r @ r) <= stop:
            break
        z = r / precondition
        rz, previous = r @ z, rz
        p = z + (rz / previous) * p
    return x


def gauss_newton(problem: BlockProblem, theta: np.ndarray, steps: int = 4, cg_iterations: int = 25,
                 damping: float = 1e-2, judge: Callable[[np.ndarray], float] | None = None) -> tuple[np.ndarray, list[float]]:
    """Levenberg-Marquardt: ``steps`` damped Gauss-Newton steps from theta; a step that does not
    lower the loss is refused and the damping raised. Returns (theta, the loss after each step);
    with ``judge`` (a held-out loss) the iterate it scores lowest, the start included."""
    losses: list[float] = []
    r = problem.linearise(theta)
    loss = float((r ** 2).sum())
    best, best_score = theta, judge(theta) if judge else math.inf  # best_score is read only with judge
    for _ in range(steps):
        grad = problem.vjp(r)
        diag = problem.diagonal()
        floor = 1e-9 * max(float(diag.mean()), 1e-300)
        scaled = damping * diag + floor

        def apply(v, scaled=scaled):
            return problem.vjp(problem.jvp(v)) + scaled * v

        delta = _conjugate_gradients(apply, -grad, diag + scaled, cg_iterations)
        trial = theta + delta
        trial_loss = problem.loss(trial)
        if trial_loss < loss:
            theta, loss, damping = trial, trial_loss, max(damping / 3, 1e-6)
            r = problem.linearise(theta)
            if judge:
                score = judge(theta)
                if score < best_score:
                    best, best_score = theta, score
        else:
            damping *= 4
        losses.append(loss)
    return (best if judge else theta), losses


# ---------------------------------------------------------------------------------------------
# The repair

class _BlockRun:
    def __init__(self, spec: BlockRefit, dense: onnx.ModelProto, layers: list[Layer], data: Dataset, provider):
        self.spec, self.dense, self.provider = spec, dense, provider
        self.feeds = {k: np.asarray(v) for k, v in data.feeds.items()}
        self.n = len(next(iter(self.feeds.values())))
        self.held = np.arange(self.n) % HOLDOUT_EVERY == 0
        self.targets = {}
        names = {layer.name: fit_target(dense, layer) for layer in layers}
        wanted = list(dict.fromkeys(t for t, _ in names.values()))
        values = dict(zip(wanted, runtime.run_tensors(dense, self.feeds, wanted, provider)))
        for layer in layers:
            name, factors = names[layer.name]
            self.targets[layer.name] = position_rows(layer, values[name], factors)

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool, rows=None):
        if not (final or self.spec.every_step):
            return current, []
        model = onnx.ModelProto()
        model.CopyFrom(current)
        names = [layer.name for layer in layers]
        blocks, reports = find_blocks(model, layers)
        with runtime.one_blas_thread():  # small products: the same rounding at any --threads, and faster
            for pair in [(b.first.name, b.second.name) for b in blocks]:
                found = analyse_graph(model).by_name()  # a written bias may have been inserted
                block = next(b for b in find_blocks(model, [found[n] for n in names])[0]
                             if (b.first.name, b.second.name) == pair)
                reports.append(self._refit_block(model, block))
        return model, reports

    def _refit_block(self, model: onnx.ModelProto, block: Block) -> LayerRefit:
        first, second = block.first, block.second
        label = f"{first.name}+{second.name}"
        target_name, factors = fit_target(model, second)
        wanted = [first.preact, target_name] + ([] if first.input in self.feeds else [first.input])
        values = runtime.run_tensors(model, self.feeds, wanted, self.provider)
        x = self.feeds[first.input] if first.input in self.feeds else values[2]
        x = np.asarray(x, np.float64).reshape(self.n, -1)
        w1 = first.to_rows(read_initializer(model, first.weight))
        w2 = second.to_rows(read_initializer(model, second.weight))
        u = np.asarray(values[0], np.float64).reshape(self.n, -1)
        b1 = (u - x @ w1.T).mean(0)
        y = position_rows(second, values[1], factors)
        b2 = (y - block.activation(u) @ w2.T).mean(0)
        scale = max(float(np.abs(y).max()), 1e-6)
        if np.abs(block.activation(x @ w1.T + b1) @ w2.T + b2 - y).max() > 1e-3 * scale:
            return LayerRefit(label, skipped="the numpy block does not reproduce the model's output")
        t = self.targets[second.name]
        fit = BlockProblem(x[~self.held], t[~self.held], w1 != 0, w2 != 0, block.activation)
        held = BlockProblem(x[self.held], t[self.held], w1 != 0, w2 != 0, block.activation)
        theta0 = fit.pack(w1, b1, w2, b2)
        theta, _ = gauss_newton(fit, theta0, self.spec.steps, self.spec.cg_iterations, self.spec.damping, held.loss)
        count = max(int(self.held.sum()), 1)
        before, after = held.loss(theta0) / count, held.loss(theta) / count
        if not after < before:
            return LayerRefit(label, heldout_error_before=before, heldout_error_after=before,
                              skipped="Gauss-Newton did not lower the held-out error")
        new_w1, new_b1, new_w2, new_b2 = fit.unpack(theta)
        inserted = write_layer(model, first, new_w1, new_b1 - b1)
        if inserted:
            second = analyse_graph(model).by_name()[second.name]
        write_layer(model, second, new_w2, new_b2 - b2)
        return LayerRefit(label, heldout_error_before=before, heldout_error_after=after)


@dataclass(frozen=True)
class BlockRefit:
    """Damped Gauss-Newton on every two-layer block (see the module docstring), at the final step
    (and every step with ``every_step``); ``steps`` Levenberg-Marquardt steps of at most
    ``cg_iterations`` conjugate-gradient iterations each; the iterate with the least held-out
    error is kept."""

    steps: int = 4
    cg_iterations: int = 25
    damping: float = 1e-2  # Levenberg-Marquardt's first lambda, relative to diag J'J
    every_step: bool = False
    name = "block Gauss-Newton"

    def start(self, dense, layers, data, output, *, provider="cpu", **_) -> _BlockRun:
        return _BlockRun(self, dense, layers, data, provider)
