"""The ensemble's input checks (features, labels, fitted state) and the comparison of two ensembles' predictions."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxprune.errors import InputError
from onnxprune.io.data import class_labels

if TYPE_CHECKING:
    from onnxprune_gibbs.estimator import GibbsEnsemble


class NotFittedError(InputError):
    pass


def same_value(value, default) -> bool:
    """Whether a parameter still holds its default (arrays compared by value)."""
    if isinstance(value, np.ndarray) or isinstance(default, np.ndarray):
        return isinstance(value, np.ndarray) and isinstance(default, np.ndarray) and np.array_equal(value, default)
    return bool(value == default) and type(value) is type(default)


def check_features(X, n_features: int | None = None, name: str = "X") -> np.ndarray:
    """X as a float32 (S, d) array: numeric, non-empty, finite, with the expected width."""
    X = np.asarray(X)
    if X.dtype == object or X.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise InputError(f"{name} must be 2-D (samples, features), got shape {list(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {list(X.shape)})")
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise InputError(f"{name} contains NaN or Inf (or values too large for float32)")
    if n_features is not None and X.shape[1] != n_features:
        raise InputError(f"{name} has {X.shape[1]} features, the ensemble was fitted on {n_features}")
    return X


def check_varying(X: np.ndarray, name: str = "X") -> None:
    """Training features that differ between samples: with every sample alike, each member predicts one
    class for all of them and no temperature can make the ensemble learn anything."""
    if len(X) > 1 and not np.any(X != X[0]):
        raise InputError(f"{name}: every sample has the same features ({len(X)} samples); the members cannot tell the "
                         "classes apart")


def check_labels(y, n_samples: int, n_classes: int | None = None, name: str = "y") -> np.ndarray:
    """y as int64 (S,): integer-valued, non-negative, below n_classes when given."""
    return class_labels(y, name, n_samples, n_classes)


def compare_predictions(a: GibbsEnsemble, b: GibbsEnsemble, X) -> dict:
    """How many predictions differ between two ensembles on X."""
    pa, pb = a.predict(X), b.predict(X)
    changed = int(np.sum(pa != pb))
    return {"samples": int(len(pa)), "predictions_changed": changed, "fraction_changed": changed / max(1, len(pa))}
