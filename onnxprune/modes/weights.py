"""The weights strategy: every weight of the prunable layers scored, the lowest masked to zero, each
row's compensation added to its bias (``edit.rewrite``); shapes do not change."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from onnxprune.edit.rewrite import largest_bias, rewrite
from onnxprune.errors import InputError
from onnxprune.find.layers import Layer, analyse_graph
from onnxprune.find.patterns import Pattern, pattern_problem
from onnxprune.io.data import Dataset
from onnxprune.modes.base import Preset, State
from onnxprune.repair.base import current_biases
from onnxprune.repair.distill import Distill
from onnxprune.score.weights import METHODS, Saliency, make_scorer
from onnxprune.select.masks import choose_masks, excluded, pattern_name, pattern_sparsity
from onnxprune.select.schedule import geometric

PRESETS = {
    "ecp-refit": Preset("ecp", geometric(5), refit=True, then=Distill(epochs=40, lr=1e-2, batch=256, patience=8),
                        fallback=True),
}
METHOD_NAMES = (*METHODS, *PRESETS)
# A model whose prunable weights are mostly in token-wise layers (a transformer's blocks): one fraction
# per layer, ECP's error at each layer's own output (no derivatives), the chained least-squares refit
# (docs/results/language-models.md measures why)
SEQUENCE_DEFAULTS = {"scope": "layer", "refit": True, "error_at": "layer"}
SEQUENCE_SHARE = 0.5


def model_defaults(layers: list[Layer], exclude, method: str) -> dict | None:
    """The defaults that fit ``layers``' model, or None for the general ones: when token-wise layers
    (MatMul on sequences, Gemms on folded tokens) hold at least SEQUENCE_SHARE of the prunable
    weights, SEQUENCE_DEFAULTS (a preset method keeps its own refit and schedule)."""
    candidates = [layer for layer in layers if not excluded(layer, exclude)]
    total = sum(layer.size for layer in candidates)
    tokens = sum(layer.size for layer in candidates if layer.kind in ("sequence", "folded"))
    if not total or tokens < SEQUENCE_SHARE * total:
        return None
    values = {k: v for k, v in SEQUENCE_DEFAULTS.items() if not (k == "refit" and method in PRESETS)}
    return {"model": "sequence", "token_share": tokens / total, "values": values}


class WeightsMode:
    """Masks over single weights: ``scope`` global (one threshold) or per layer, or an N:M ``pattern``
    (``select.masks``); ``compensation`` adds the removed weights' expected contribution to the
    biases (methods that have one)."""

    name = "weights"
    masked = True

    def __init__(self, scope: str = "global", compensation: bool = True, exclude=(), pattern: Pattern | None = None):
        self.scope, self.compensation, self.exclude, self.pattern = scope, compensation, tuple(exclude), pattern

    def preset(self, method: str) -> Preset:
        if method not in METHOD_NAMES:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
        return PRESETS.get(method, Preset(method))

    def make_scorer(self, method: str):
        return make_scorer(method)

    def check(self, target: float) -> None:
        if not 0.0 <= target <= 1.0:
            raise InputError(f"sparsity must be between 0 and 1, got {target}")
        if self.pattern is not None and abs(target - pattern_sparsity(self.pattern)) > 1e-9:
            raise InputError(f"the pattern {pattern_name(self.pattern)} prunes {pattern_sparsity(self.pattern):g} of the "
                             f"weights, not {target:g}")

    def find(self, model: onnx.ModelProto, layers: list[Layer], output: str, all_layers: list[Layer],
             data: Dataset) -> list:
        """Nothing beyond the layers: every weight of every layer is a candidate (with a pattern, every
        layer's inputs must split into its groups: said before anything is scored)."""
        pattern = self.pattern
        if pattern is None:
            return []
        for layer in layers:
            problem = None if excluded(layer, self.exclude) else pattern_problem(layer, pattern)
            if problem:
                raise InputError(f"{problem}: the pattern {pattern_name(pattern)} needs groups of {pattern[1]}; "
                                 f"leave it out with --exclude {layer.name}")
        return []

    def begin(self, model: onnx.ModelProto, layers: list[Layer]) -> State:
        masks = {layer.name: np.zeros((layer.out_features, layer.in_features), bool) for layer in layers}
        return State(model, layers, carried=masks)

    def select(self, state: State, scores: dict[str, Saliency], target: float) -> dict[str, np.ndarray]:
        """Masks (True = pruned) with exactly round(target * n) weights; weights already pruned stay so."""
        ranked = _keep_pruned({name: s.scores for name, s in scores.items()}, state.carried)
        return choose_masks(state.layers, ranked, target, self.scope, self.exclude, self.pattern)

    def edit(self, state: State, masks: dict[str, np.ndarray], scores: dict[str, Saliency]) -> State:
        shifts = _shifts(scores) if self.compensation else None
        model, changes = rewrite(state.model, state.layers, masks, shifts)
        return State(model, fresh(model, state.layers), carried=masks, changes=changes)

    def repaired(self, state: State, model: onnx.ModelProto) -> State:
        """``state`` after a repair wrote ``model`` (it may have inserted biases)."""
        return State(model, fresh(model, state.layers), carried=state.carried, changes=state.changes)

    def to_repair(self, state: State) -> tuple[list[Layer], None]:
        return [layer for layer in state.layers if not excluded(layer, self.exclude)], None

    def finish(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
        return model, {}

    def report(self, dense: State, state: State, scores: dict[str, Saliency], masks: dict[str, np.ndarray],
               data: Dataset, repaired: bool) -> tuple[list, dict]:
        """Per layer what the rewrite did (the bias change against the dense model when steps or a
        repair followed), and the mode's summary."""
        changes = state.changes
        if repaired:  # the bias change against the dense model, read off both models (one run each)
            feeds = data.subset(8).feeds
            old, new = current_biases(dense.model, dense.layers, feeds), current_biases(state.model, state.layers, feeds)
            changes = [replace(c, max_bias_shift=float(np.max(np.abs(after.bias_shift_to_stored(new[after.name]
                                                                                                  - old[before.name])))))
                       for c, before, after in zip(changes, dense.layers, state.layers)]
        changes = [replace(c, dense_bias=largest_bias(dense.model, before), max_bias=largest_bias(state.model, after))
                   for c, before, after in zip(changes, dense.layers, state.layers)]
        weights, pruned = sum(c.weights for c in changes), sum(c.pruned for c in changes)
        return changes, {"compensation": self.compensation and _shifts(scores) is not None,
                         "pattern": pattern_name(self.pattern),
                         "weights": weights, "pruned": pruned, "sparsity": pruned / weights if weights else 0.0,
                         "score_sum": float(sum(scores[name].scores[m].sum() for name, m in masks.items()))}


def fresh(model: onnx.ModelProto, layers: list[Layer]) -> list[Layer]:
    """The same layers re-read from ``model`` (an edit or a repair may have inserted biases), each
    keeping its kind: whether a Gemm's rows fold tokens was told by shapes measured on the analysis
    copy, which a sliced model's shape inference may no longer see."""
    found = analyse_graph(model).by_name()
    return [replace(found[layer.name], kind=layer.kind) for layer in layers]


def _keep_pruned(scores: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores where already-pruned weights rank below every other, so they stay pruned."""
    if not any(m.any() for m in pruned.values()):
        return scores
    floor = min(float(s.min()) for s in scores.values()) - 1.0
    return {name: np.where(pruned[name], floor, s) for name, s in scores.items()}


def _shifts(saliencies: dict[str, Saliency]) -> dict[str, np.ndarray] | None:
    shifts = {name: s.shifts for name, s in saliencies.items() if s.shifts is not None}
    return shifts if len(shifts) == len(saliencies) else None
