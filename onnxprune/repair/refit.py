"""The ridge least-squares refit: the repair ``ecp-refit`` applies after every step (see ``repairs``).

``Refit`` re-solves each row's surviving weights and bias so that the
layer reproduces the dense model's pre-activations from the inputs it actually receives: the pruned
network's own activations when ``chained`` (every layer repairs the error it inherits), the dense
network's otherwise. Pruned weights stay exactly zero. With ``g_weighted`` the final step's refit
weights each sample's squared error in row i by G_i, the output sensitivity ECP already computes
(of the network before that refit), so the fit spends its capacity where the output is sensitive.

Rows are fit over what the weights multiply: the layer input for a dense layer, every position's
patch for a Conv (im2col) or a sequence MatMul, so positions count as samples of the least squares.
A layer followed by a BatchNormalization that holds its bias is fit on the BN output divided by
the BN's scale (a - mean + B / scale): the pre-activation with its bias, whatever encodes it.
Per layer this is one streamed pass over the calibration data accumulating the Gram matrix of
[x, 1] (one per group; one per row over its survivors when weighted) and cross-terms with the
dense targets. Rows are solved together from one factorisation per layer (``solve_rows``). The
ridge damping lambda = delta * mean(diag Gram) is chosen per layer by the error on held-out
calibration samples (every fifth), never on test data, from a few rows' solves: the whole grid
at the first step, the previous choice and its neighbours at a final step, the previous choice
alone at the steps between. Rows are fit on the other four fifths only, so the held-out fifth
stays unseen by every choice made on it (the damping, the distillation's epoch, the ecp-refit
preset's fallback). A layer whose refit does not lower its held-out error keeps its weights.

A run keeps, across steps, one session of the dense model (its targets, cached while they fit in
memory), one session of the pruned network with the layers' weights and biases as inputs (a step
feeds new values instead of building a model), and the moments of layers whose inputs do not
depend on any refit weight (the first layer's, or all of them unchained). The products run on one
BLAS thread: the same rounding at any --threads, and on a busy machine the faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import runtime
from onnxprune.derivatives.engines import output_jacobians
from onnxprune.derivatives.plan import protected
from onnxprune.edit.rewrite import ensure_bias
from onnxprune.find.layers import Layer, analyse_graph
from onnxprune.graph.index import read_initializer, tensor_types
from onnxprune.io.data import Dataset
from onnxprune.prepare.shapes import output_shape
from onnxprune.repair.base import (
    LayerRefit,
    fit_target,
    linear_rows,
    parametric,
    patch_rows,
    position_rows,
    refit_problem,
    structure_key,
    write_layer,
)
from onnxprune.repair.chain import Pieces
from onnxprune.repair.lstsq import (
    GRID_ROWS,
    HOLDOUT_EVERY,
    Moments,
    damping_candidates,
    moment_errors,
    solve_own,
    solve_rows,
)

CACHE_BYTES = 256 * 2**20     # dense targets kept between steps up to this size
ROW_BLOCK_BYTES = 256 * 2**20  # bound on a block of per-row (G-weighted) Gram matrices


class _Network:
    """The pruned network as one session whose refit layers' weights and biases are inputs, so a
    new step (or a refit layer) feeds new values instead of building a new model."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], outputs: list[str], provider, threads):
        self.key = structure_key(model)
        self.names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        m = parametric(runtime.runtime_copy(model), self.names)
        types = tensor_types(m)
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None)
                              for n in dict.fromkeys(outputs))
        self.session = runtime.make_session(m, provider, threads)
        self.values: dict[str, np.ndarray] = {}
        self.update(model)

    def update(self, model: onnx.ModelProto, names=None) -> None:
        wanted = set(self.names if names is None else names)
        self.values.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted})

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, {**feeds, **self.values})


class _DenseTargets:
    """The dense model's fit targets per batch and layer, from one session: every layer's from one
    run of a batch, kept as the session returns them while they fit in CACHE_BYTES (in graph order;
    the others take a run each when asked for); a layer whose rows are a subset of the dense layer's
    (units sliced away) gets those rows."""

    def __init__(self, dense: onnx.ModelProto, layers: list[Layer], provider, threads):
        self.layers = {layer.name: layer for layer in layers}
        self.targets = {layer.name: fit_target(dense, layer) for layer in layers}
        self.names = list(dict.fromkeys(t for t, _ in self.targets.values()))
        self.session = runtime.tensor_session(dense, self.names, provider, threads, arena=False)  # runs once a batch
        self.cache: dict[tuple[int, str], np.ndarray] = {}
        self.size = 0
        self.batches: set[int] = set()  # batches whose targets were all computed once

    def __call__(self, index: int, feeds, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        target, factors = self.targets[name]
        a = self.cache.get((index, target))
        if a is None:
            wanted = [target] if index in self.batches else self.names
            values = dict(zip(wanted, self.session.run(wanted, feeds)))
            self.batches.add(index)
            a = values[target]
            for n, v in values.items():
                if self.size + v.nbytes <= CACHE_BYTES:
                    self.cache[(index, n)] = v
                    self.size += v.nbytes
        t = position_rows(self.layers[name], a, factors)
        return t if rows is None else t[:, rows]


def _shared_fit(layer, fit: Moments, held: Moments, keep: np.ndarray, theta_now: np.ndarray, candidates: list[float]):
    """Unweighted rows: (damping, theta on the fit samples, held-out error before and after), the
    errors summed over the GRID_ROWS rows spread over the layer whose held-out solves chose the
    damping (with one candidate, the final solve's rows: there is nothing to choose)."""
    per_group = fit.per_group
    sample = np.unique(np.linspace(0, layer.out_features - 1, GRID_ROWS).astype(int))
    mine = [sample[sample // per_group == g] for g in range(fit.gram.shape[0])]

    def held_error(theta_rows: np.ndarray, g: int) -> float:
        return float(moment_errors(theta_rows, held.gram[g], held.cross[g][:, mine[g]], held.tt[mine[g]]).sum())

    groups = [g for g in range(fit.gram.shape[0]) if len(mine[g])]
    before = sum(held_error(theta_now[mine[g]], g) for g in groups)
    scores = np.zeros(len(candidates))
    if len(candidates) > 1:
        for c, delta in enumerate(candidates):
            scores[c] = sum(held_error(solve_rows(fit.gram[g], fit.cross[g][:, mine[g]], keep[mine[g]], delta), g)
                            for g in groups)
    best = int(np.argmin(scores))
    theta = np.zeros((layer.out_features, layer.in_features + 1))
    for g in range(fit.gram.shape[0]):
        rows = np.arange(g * per_group, (g + 1) * per_group)
        theta[rows] = solve_rows(fit.gram[g], fit.cross[g][:, rows], keep[rows], candidates[best])
    if len(candidates) == 1:
        scores[0] = sum(held_error(theta[mine[g]], g) for g in groups)
    return candidates[best], theta, before, scores[best]


def _weighted_fit(fit: Moments, held: Moments, survivors, in_features: int, theta_now: np.ndarray,
                  candidates: list[float]):
    """G-weighted rows of one block: (damping, theta (rows, in + 1) on the fit samples, held-out error
    before and after summed over the GRID_ROWS rows whose solves chose the damping)."""
    rows = fit.rows
    sample = np.unique(np.linspace(0, len(rows) - 1, GRID_ROWS).astype(int))

    def held_error(slot, theta):
        return float(theta @ held.row_gram[slot] @ theta - 2 * theta @ held.row_cross[slot] + held.tt[rows[slot]])

    scales = np.maximum(fit.diag, 1e-12)
    scores = [sum(held_error(s, th) for s, th in zip(sample, solve_own(
        [fit.row_gram[s] for s in sample], [fit.row_cross[s] for s in sample], scales[sample], delta))) for delta in candidates]
    best = int(np.argmin(scores))
    before = sum(held_error(s, np.append(theta_now[rows[s], survivors[rows[s]]], theta_now[rows[s], -1])) for s in sample)
    final = solve_own(fit.row_gram, fit.row_cross, scales, candidates[best])
    theta = np.zeros((len(rows), in_features + 1))
    for slot, (i, th) in enumerate(zip(rows, final)):
        theta[slot, survivors[i]], theta[slot, -1] = th[:-1], th[-1]
    return candidates[best], theta, before, scores[best]


def _row_blocks(survivors: list[np.ndarray]) -> list[np.ndarray]:
    """Rows grouped so that one block's per-row Gram matrices fit in ROW_BLOCK_BYTES."""
    blocks: list[np.ndarray] = []
    current: list[int] = []
    size = 0
    for i in range(len(survivors)):
        need = 8 * (len(survivors[i]) + 1) ** 2
        if current and size + need > ROW_BLOCK_BYTES:
            blocks.append(np.array(current))
            current, size = [], 0
        current.append(i)
        size += need
    blocks.append(np.array(current))
    return blocks


@dataclass(frozen=True)
class Refit:
    """Ridge least-squares refit of every layer's surviving weights and biases towards the dense
    model's pre-activations, layer by layer in graph order, after every step; ``chained``: on the
    pruned network's own inputs; ``g_weighted``: the final step's refit weights samples by G."""

    chained: bool = True
    g_weighted: bool = False
    damping: float | None = None  # a fixed delta instead of the held-out choice

    @property
    def name(self) -> str:
        return "refit" + ("" if self.chained else " (dense inputs)") + (", G-weighted" if self.g_weighted else "")

    def start(self, dense, layers, data, output, **options) -> RefitRun:
        """A run over ``layers`` (of ``dense``); ``masked=False`` (whole units removed) frees every
        weight, where by default the zeros are the mask and stay zero."""
        if self.g_weighted and not self.chained:
            raise ValueError("a G-weighted refit is always chained")
        return RefitRun(self, dense, layers, data, output, **options)


class RefitRun:
    """One pruning run's refits: the state reused from step to step (see the module docstring)."""

    def __init__(self, spec: Refit, dense: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
                 batch_size: int = 256, provider: str = "cpu", threads: int | None = None,
                 progress: Callable[[int, int], None] | None = None, masked: bool = True, objective=None):
        self.spec, self.dense, self.data, self.output, self.masked = spec, dense, data, output, masked
        self.objective = objective  # the protected outputs' parts and scales (find.objective), for the G-weighting
        self.batch_size, self.provider, self.threads, self.progress = batch_size, provider, threads, progress
        self.targets = _DenseTargets(dense, layers, provider, threads)
        self.network: _Network | None = None
        self.pieces: Pieces | None = None
        self.dense_network: _Network | None = None
        self.fixed: dict[tuple, tuple[Moments, Moments]] = {}  # moments whose inputs never change, per shape
        self.damping: dict[str, float] = {}
        self.shape = output_shape(*protected(dense, output, objective), data.feeds, provider) if spec.g_weighted else None

    def _session(self, model: onnx.ModelProto, layers: list[Layer]) -> _Network:
        if self.network is None or self.network.key != structure_key(model):
            outputs = [n for layer in layers for n in (layer.input, fit_target(model, layer)[0])]
            self.network = _Network(model, layers, outputs, self.provider, self.threads)
        else:
            self.network.update(model)
        return self.network

    def _fixed_input(self, model: onnx.ModelProto, layer: Layer, layers: list[Layer]) -> bool:
        """Whether the layer's input is the same in every step: unchained, or not downstream of any
        refit weight."""
        if not self.spec.chained:
            return True
        params = {n for other in layers for n in (other.weight, other.bias) if n}
        tainted = set(params)
        for node in model.graph.node:  # graph order is topological
            if any(i in tainted for i in node.input):
                tainted.update(node.output)
        return layer.input not in tainted

    def __call__(self, current: onnx.ModelProto, layers: list[Layer], final: bool,
                 rows: dict[str, np.ndarray] | None = None):
        """Refit ``layers`` of ``current`` towards the dense pre-activations (of the dense ``rows``
        a layer kept, where units were removed); the new model and one LayerRefit per layer."""
        weighted = self.spec.g_weighted and final
        model = onnx.ModelProto()
        model.CopyFrom(current)
        names = [layer.name for layer in layers]
        jac = None
        if weighted:
            width = int(np.prod(self.shape)) if self.shape else 1
            target, name = protected(model, self.output, self.objective)
            jac = output_jacobians(target, layers, name, width, provider=self.provider, threads=self.threads)
        pieces = None
        if self.spec.chained and not weighted:  # inputs from the network cut before every layer (repair.chain)
            if any(ensure_bias(model, layer) for layer in layers if not refit_problem(layer)):
                found = analyse_graph(model).by_name()
                layers = [found[n] for n in names]
            pieces = self._pieces(model, layers)
        reports, inserted = [], pieces is None
        for done, name in enumerate(names):
            if inserted:  # fresh: a written bias may have been inserted
                found = analyse_graph(model).by_name()
                layers = [found[n] for n in names]
            layer = layers[done]
            problem = refit_problem(layer)
            if problem:
                reports.append(LayerRefit(name, skipped=problem))
            else:
                with runtime.one_blas_thread():  # small products: the same rounding at any --threads, and faster
                    report, inserted = self._refit_layer(model, layer, layers, jac, final, (rows or {}).get(name),
                                                         None if pieces is None else pieces.cache)
                reports.append(report)
            if pieces is not None and done + 1 < len(names):
                pieces.update(model, [layer.weight, layer.bias])
                pieces.advance(done)
            if self.progress:
                self.progress(done + 1, len(names))
        return model, reports

    def _pieces(self, model: onnx.ModelProto, layers: list[Layer]) -> Pieces | None:
        """The network cut before every layer (kept across steps while the graph is the same), run up
        to the first layer; None when there is no layer, the layers are not in graph order or the cuts
        would not fit."""
        if not layers:
            return None
        if self.pieces is None or self.pieces.key != structure_key(model):
            self.pieces = Pieces(model, layers, {layer.name: fit_target(model, layer)[0] for layer in layers},
                                 self.provider, self.threads)
        if [layer.name for layer in self.pieces.layers] != [layer.name for layer in layers]:
            return None
        self.pieces.update(model)
        return self.pieces if self.pieces.start([feeds for feeds, _ in self.data.batches(self.batch_size)]) else None

    def _refit_layer(self, model, layer, layers, jac, final, dense_rows, cut=None):
        """Refit one layer; its inputs from ``cut`` (per batch, the values cut before it: ``Pieces``)
        when given, else from a session of the whole network."""
        network = self._session(model, layers) if cut is None else None
        source = (network if self.spec.chained else self._dense_session(layers)) if cut is None else None
        weight = layer.to_rows(read_initializer(model, layer.weight))
        keep = weight != 0 if self.masked else np.ones(weight.shape, bool)
        survivors = [np.flatnonzero(row) for row in keep]
        target, factors = fit_target(model, layer)
        if cut is None:
            bias = self._bias(network, layer, weight, target, factors)
        else:
            z, a = cut[0][layer.input], cut[0][target]
            bias = (position_rows(layer, a, factors) - linear_rows(layer, patch_rows(layer, z), weight)).mean(0)
        weighted = jac is not None
        fixed = not weighted and self._fixed_input(model, layer, layers)
        blocks = _row_blocks(survivors) if weighted else [None]
        results = []
        for rows in blocks:
            key = (layer.name, layer.in_features, layer.out_features)
            if fixed and key in self.fixed:
                fit, held = self.fixed[key]
            else:
                fit = Moments(layer, survivors if weighted else None, rows)
                held = Moments(layer, survivors if weighted else None, rows)
                offset = 0
                for index, (feeds, _) in enumerate(self.data.batches(self.batch_size)):
                    z = (cut[index][layer.input] if cut is not None else feeds[layer.input] if layer.input in feeds
                         else source.run([layer.input], feeds)[0])
                    x, t, g = patch_rows(layer, z), self.targets(index, feeds, layer.name, dense_rows), None
                    if weighted:
                        g = jac(feeds, self.shape)[0][layer.name]  # (batch, out) or (batch, out, positions)
                        g = g.reshape(len(g), layer.out_features, -1).transpose(0, 2, 1).reshape(-1, layer.out_features)
                    n = len(next(iter(feeds.values())))
                    hold = np.repeat((offset + np.arange(n)) % HOLDOUT_EVERY == 0, len(x) // n)  # whole samples
                    offset += n
                    fit.add(x[~hold], t[~hold], None if g is None else g[~hold])
                    held.add(x[hold], t[hold], None if g is None else g[hold])
                if fixed:
                    self.fixed[key] = (fit, held)
            theta_now = np.concatenate([weight, bias[:, None]], axis=1)
            candidates = damping_candidates(self.damping.get(layer.name), self.spec.damping, explore=final)
            if weighted:
                delta, theta, before, after = _weighted_fit(fit, held, survivors, layer.in_features, theta_now, candidates)
            else:
                rows = np.arange(layer.out_features)
                delta, theta, before, after = _shared_fit(layer, fit, held, keep, theta_now, candidates)
            results.append((rows, delta, theta, before, after))
        new_weight, new_bias = weight.copy(), bias.copy()
        for rows, _, theta, _, _ in results:
            new_weight[rows], new_bias[rows] = theta[:, :-1], theta[:, -1]
        dampings = [r[1] for r in results]
        self.damping[layer.name] = float(np.median(dampings))
        sampled = max(held.count, 1) * sum(min(GRID_ROWS, len(r[0])) for r in results)
        report = LayerRefit(layer.name, self.damping[layer.name], sum(r[3] for r in results) / sampled,
                            sum(r[4] for r in results) / sampled, weighted)
        new_weight[~keep] = 0.0
        inserted = write_layer(model, layer, new_weight, new_bias - bias)
        if self.network is not None and not inserted and self.network.key == structure_key(model):
            self.network.update(model, [layer.weight, layer.bias])
        return report, inserted

    def _bias(self, network, layer, weight, target, factors):
        feeds = next(self.data.batches(self.batch_size))[0]
        few = {k: v[:64] for k, v in feeds.items()}
        if layer.input in few:
            z, (cur,) = few[layer.input], network.run([target], few)
        else:
            z, cur = network.run([layer.input, target], few)
        return (position_rows(layer, cur, factors) - linear_rows(layer, patch_rows(layer, z), weight)).mean(0)

    def _dense_session(self, layers) -> _Network:
        if self.dense_network is None:
            outputs = [layer.input for layer in layers]
            self.dense_network = _Network(self.dense, [], outputs, self.provider, self.threads)
        return self.dense_network


def refit(dense: onnx.ModelProto, current: onnx.ModelProto, layers: list[Layer], data: Dataset, output: str, *,
          chained: bool = True, g_weighted: bool = False, damping: float | None = None, batch_size: int = 256,
          provider: str = "cpu", threads: int | None = None, progress: Callable[[int, int], None] | None = None):
    """One refit of every layer of ``current`` (pruned; zeros are the mask) towards ``dense``, in
    graph order: the refit model and one LayerRefit per layer."""
    run = Refit(chained, g_weighted, damping).start(dense, layers, data, output, batch_size=batch_size, provider=provider,
                                           threads=threads, progress=progress)
    return run(current, layers, final=True)
