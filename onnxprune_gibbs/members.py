"""Random, untrained member classifiers, stored as stacked weight arrays, with a numpy forward pass.

A bank of M members keeps one array per layer for all members: ``weights[l]`` has shape
(M, fan_in, fan_out) and ``biases[l]`` (M, fan_out) or None. Weights are stored as float32 (as in the
exported graph) and every computation is done in float64 on those float32 values, exactly as the
exported ONNX graph does, so that the two agree to the last bit where it matters (see export.py).

Kinds
- ``perceptron``: one linear layer. With two classes a member is a binary perceptron with a single
  score s = w.x + b and predicts class 1 iff s > 0 (softmax of [0, s] = sigmoid(s) for probabilities);
  with K > 2 classes a member is a random linear map to K scores followed by argmax.
- ``mlp``: hidden layers of the given widths with tanh or relu, then a linear output layer.

Weight scales (documented choices; ``weight_scale`` multiplies all of them)
- every weight is drawn N(0, (gain * weight_scale)^2 / fan_in): LeCun scaling, gain 1 for the output
  layer and for tanh hidden layers, gain sqrt(2) for relu hidden layers (He scaling), so that
  pre-activations have unit variance for standardised inputs;
- biases are N(0, bias_scale^2); bias_scale = 0 (the default) means no biases at all.
The scale does not change 0-1 energies or hard votes of a perceptron (sign/argmax are invariant to
a positive factor); it sets the members' confidence for cross-entropy energies and soft votes.

Each member is drawn from its own generator ``SeedSequence(seed).spawn(...)[k]``, so member k of a
seed is the same whatever the number of members: ensembles of 100 and 10000 members with the same
seed are nested.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.errors import InputError
from onnxprune.io.files import available_memory

KINDS = ("perceptron", "mlp")
ACTIVATIONS = ("tanh", "relu")
# Elements of the largest float64 temporary a forward block may create (~64 MB).
BLOCK_ELEMENTS = 8_000_000
# Each member is drawn from its own generator: a million take about a minute (100 times the largest study).
MAX_MEMBERS = 1_000_000


@dataclass
class MemberBank:
    """M random classifiers with stacked weights (float32) and the shared activation."""

    kind: str
    weights: list[np.ndarray]
    biases: list[np.ndarray | None]
    activation: str
    n_classes: int

    @property
    def n_members(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def n_features(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def n_outputs(self) -> int:
        """Scores per member: 1 for binary perceptrons/MLPs (sign decides), else n_classes."""
        return int(self.weights[-1].shape[2])

    @property
    def widths(self) -> list[int]:
        return [int(w.shape[2]) for w in self.weights]

    def subset(self, index) -> MemberBank:
        """The members selected by ``index`` (boolean mask or integer indices), in that order."""
        return MemberBank(
            self.kind,
            [w[index] for w in self.weights],
            [None if b is None else b[index] for b in self.biases],
            self.activation,
            self.n_classes,
        )

    def n_parameters(self) -> int:
        return int(sum(w.size for w in self.weights) + sum(0 if b is None else b.size for b in self.biases))


def layer_sizes(kind: str, n_features: int, n_classes: int, hidden=()) -> list[int]:
    n_out = 1 if n_classes == 2 else n_classes
    if kind == "perceptron":
        return [n_features, n_out]
    if kind == "mlp":
        if not hidden:
            raise InputError("an mlp needs at least one hidden layer (e.g. hidden=(64,))")
        return [n_features, *[int(h) for h in hidden], n_out]
    raise InputError(f"unknown member kind {kind!r}; choose one of {', '.join(KINDS)}")


def draw_members(kind: str, n_members: int, n_features: int, n_classes: int, hidden=(64,),
                 activation: str = "tanh", weight_scale: float = 1.0, bias_scale: float = 0.0,
                 seed: int = 0) -> MemberBank:
    """Draw ``n_members`` random classifiers (see the module docstring for the distributions)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if not 1 <= n_members <= MAX_MEMBERS:
        raise InputError(f"the ensemble needs 1 to {MAX_MEMBERS:,} members, got {n_members:,}")
    if n_classes < 2:
        raise InputError(f"need at least two classes, got {n_classes}")
    if not (np.isfinite(weight_scale) and weight_scale > 0):
        raise InputError(f"weight_scale must be a positive number, got {weight_scale}")
    if not (np.isfinite(bias_scale) and bias_scale >= 0):
        raise InputError(f"bias_scale must be a non-negative number, got {bias_scale}")
    sizes = layer_sizes(kind, n_features, n_classes, hidden)
    if any(s < 1 for s in sizes):
        raise InputError(f"layer widths must be positive, got {sizes}")
    _check_memory(n_members, sizes)
    n_layers = len(sizes) - 1
    gains = [np.sqrt(2.0) if (activation == "relu" and i < n_layers - 1) else 1.0 for i in range(n_layers)]
    weights = [np.empty((n_members, sizes[i], sizes[i + 1]), np.float32) for i in range(n_layers)]
    biases = [np.empty((n_members, sizes[i + 1]), np.float32) if bias_scale > 0 else None for i in range(n_layers)]
    for k in range(n_members):  # member k's generator: SeedSequence(seed).spawn(n)[k], made when needed
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(k,)))
        for i in range(n_layers):
            std = gains[i] * weight_scale / np.sqrt(sizes[i])
            weights[i][k] = rng.standard_normal((sizes[i], sizes[i + 1])) * std
            bias = biases[i]
            if bias is not None:
                bias[k] = rng.standard_normal(sizes[i + 1]) * bias_scale
    return MemberBank(kind, weights, biases, activation, int(n_classes))


def _check_memory(n_members: int, sizes: list[int]) -> None:
    """Refuse before allocating a bank that, with its exported graph and that graph's serialized copy,
    would not fit in the memory available."""
    parameters = n_members * sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    need, available = 3 * 4 * parameters, available_memory()
    if need > available:
        raise InputError(f"{n_members:,} members of {parameters // n_members:,} parameters need about {need / 1e9:,.1f} GB "
                         f"(the members, the exported graph and its bytes); {available / 1e9:,.1f} GB are available: "
                         "use fewer members")


def member_block_size(bank: MemberBank, n_samples: int) -> int:
    """How many members to run at once so that a block's temporaries stay near BLOCK_ELEMENTS."""
    per_member = max(1, n_samples) * max(max(bank.widths), bank.n_classes)
    return int(max(1, min(bank.n_members, BLOCK_ELEMENTS // per_member)))


def _activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "tanh":
        return np.tanh(z, out=z)
    return np.maximum(z, 0.0, out=z)


def logits(bank: MemberBank, x: np.ndarray, members: slice = slice(None)) -> np.ndarray:
    """Scores (m, S, n_outputs) in float64 of the selected members for float64 inputs ``x`` (S, d).

    The first layer is one GEMM for all members: x (S, d) @ W (d, m*h), as in the exported graph.
    """
    w0 = bank.weights[0][members]
    m, d, h = w0.shape
    z = x @ w0.astype(np.float64).transpose(1, 0, 2).reshape(d, m * h)
    if bank.biases[0] is not None:
        z += bank.biases[0][members].astype(np.float64).reshape(m * h)
    z = z.reshape(len(x), m, h).transpose(1, 0, 2)
    for w, b in zip(bank.weights[1:], bank.biases[1:], strict=True):
        z = np.matmul(_activate(np.ascontiguousarray(z), bank.activation), w[members].astype(np.float64))
        if b is not None:
            z += b[members].astype(np.float64)[:, None, :]
    return z


def labels_from_logits(z: np.ndarray) -> np.ndarray:
    """Each member's predicted class (m, S): s > 0 for single-score members, else argmax (first max)."""
    if z.shape[2] == 1:
        return (z[:, :, 0] > 0).astype(np.int64)
    return np.argmax(z, axis=2)


def proba_from_logits(z: np.ndarray) -> np.ndarray:
    """Each member's class probabilities (m, S, K): [1 - sigmoid(s), sigmoid(s)] or softmax."""
    if z.shape[2] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z))
        return np.concatenate([1.0 - p1, p1], axis=2)
    e = np.exp(z - z.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def losses_from_logits(z: np.ndarray, y: np.ndarray, energy: str, labels: np.ndarray | None = None) -> np.ndarray:
    """Per-member, per-sample loss (m, S): 0-1 loss or cross-entropy (natural log) of the true class."""
    if energy == "zero-one":
        if labels is None:
            labels = labels_from_logits(z)
        return (labels != y[None, :]).astype(np.float64)
    if z.shape[2] == 1:
        s = z[:, :, 0]
        sign = np.where(y[None, :] == 1, 1.0, -1.0)
        return np.logaddexp(0.0, -sign * s)  # -log sigmoid(+-s)
    top = z.max(axis=2, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(axis=2, keepdims=True)))[:, :, 0]
    return lse - np.take_along_axis(z, y[None, :, None], axis=2)[:, :, 0]
