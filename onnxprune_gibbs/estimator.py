"""GibbsEnsemble: a scikit-learn-style estimator over random, untrained members.

fit(X, y) draws the members (seeded), computes each member's energy E_k on the training data
(per-sample mean 0-1 loss or cross-entropy), chooses the temperature T and sets the Gibbs weights
p_k = exp(-E_k/T)/Z. Temperature choices:
- ``"auto"`` (default): hold out ``validation_fraction`` of the training data, compute energies on
  the rest, pick the temperature of ``temperature_grid`` (default: a log grid of 41 values over
  +-2 decades around std(E)) with the fewest validation errors (ties: the middle of the tied set),
  then (``refit=True``) recompute the energies on all training data and keep that T;
- ``"std"``: the label-free estimate T = std(E_k) of the training energies;
- a positive number (``inf`` is the uniform average).

Inputs are rounded to float32 first (the exported graph's input type), then everything is computed
in float64, like the exported graph. Predictions are the first argmax of the weighted votes: the
members' one-hot decisions (``vote="hard"``) or their probabilities (``vote="soft"``).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import sys

import numpy as np

from onnxprune.errors import InputError
from onnxprune_gibbs import gibbs
from onnxprune_gibbs.checks import NotFittedError, check_features, check_labels, check_varying, same_value
from onnxprune_gibbs.members import (
    KINDS,
    MemberBank,
    draw_members,
    labels_from_logits,
    logits,
    losses_from_logits,
    member_block_size,
    proba_from_logits,
)

ENERGIES = ("zero-one", "cross-entropy")
VOTES = ("hard", "soft")


class GibbsEnsemble:
    """Gibbs-weighted ensemble of random classifiers (see the module docstring).

    Fitted attributes: ``members_`` (MemberBank), ``energies_`` (M,), ``temperature_``,
    ``temperature_std_``, ``log_weights_``, ``weights_`` (quantised vote weights),
    ``effective_size_``, ``n_classes_``, ``classes_``, ``n_features_in_``, ``x_mean_`` (or None),
    ``validation_curve_`` (for temperature="auto", else None), ``n_train_``; ``dropped_`` (the
    counts of ``drop_members``, else None).
    """

    validation_curve_: dict | None
    dropped_: dict | None = None

    def __init__(self, n_members: int = 1000, kind: str = "perceptron", hidden=(64,), activation: str = "tanh",
                 weight_scale: float = 1.0, bias_scale: float = 0.0, center: bool = False,
                 energy: str = "zero-one", vote: str = "hard", temperature="auto", temperature_grid=None,
                 validation_fraction: float = 0.25, refit: bool = True, n_classes: int | None = None,
                 batch_size: int = 1024, random_state: int = 0, progress: bool = False):
        self.n_members = n_members
        self.kind = kind
        self.hidden = hidden
        self.activation = activation
        self.weight_scale = weight_scale
        self.bias_scale = bias_scale
        self.center = center
        self.energy = energy
        self.vote = vote
        self.temperature = temperature
        self.temperature_grid = temperature_grid
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.n_classes = n_classes
        self.batch_size = batch_size
        self.random_state = random_state
        self.progress = progress

    # -- scikit-learn protocol -------------------------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The parameters are the constructor's keyword arguments, each stored under its own name
        (scikit-learn's ``BaseEstimator._get_param_names``), sorted."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> GibbsEnsemble:
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"unknown parameter {name!r} for {type(self).__name__}; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """The parameters that differ from the constructor's defaults, as scikit-learn prints them."""
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items()
                   if not same_value(value, defaults[name])]
        return f"{type(self).__name__}({', '.join(changed)})"

    def _check_params(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown member kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.energy not in ENERGIES:
            raise InputError(f"unknown energy {self.energy!r}; choose one of {', '.join(ENERGIES)}")
        if self.vote not in VOTES:
            raise InputError(f"unknown vote {self.vote!r}; choose one of {', '.join(VOTES)}")
        if not isinstance(self.n_members, (int, np.integer)) or self.n_members < 1:
            raise InputError(f"n_members must be a positive integer, got {self.n_members!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.temperature, str):
            if self.temperature not in ("auto", "std"):
                raise InputError(f"temperature must be 'auto', 'std' or a positive number, got {self.temperature!r}")
        else:
            gibbs.check_temperature(self.temperature, allow_zero=False)
        if self.temperature == "auto":
            f = self.validation_fraction
            if not (isinstance(f, (int, float)) and 0 < f < 1):
                raise InputError(f"validation_fraction must be between 0 and 1, got {f!r}")
            if self.temperature_grid is not None:
                gibbs.check_grid(self.temperature_grid)
        if self.n_classes is not None and (not isinstance(self.n_classes, (int, np.integer)) or self.n_classes < 2):
            raise InputError(f"n_classes must be an integer >= 2, got {self.n_classes!r}")

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y) -> GibbsEnsemble:
        self._check_params()
        X = check_features(X)
        check_varying(X)
        y = check_labels(y, len(X), self.n_classes)
        n_classes = int(self.n_classes or (y.max() + 1))
        if n_classes < 2:
            raise InputError("the training labels hold a single class; need at least two")
        self.n_classes_ = n_classes
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = X.shape[1]
        self.n_train_ = len(X)
        self.x_mean_ = X.astype(np.float64).mean(axis=0) if self.center else None
        self.members_ = draw_members(self.kind, int(self.n_members), X.shape[1], n_classes, tuple(self.hidden or ()),
                                     self.activation, float(self.weight_scale), float(self.bias_scale),
                                     int(self.random_state))
        self.validation_curve_ = None
        if self.temperature == "auto":
            self._fit_auto(X, y)
        else:
            loss, _ = self._scan(X, y, want_loss=True)
            energies = loss / len(X)
            t = gibbs.std_temperature(energies) if self.temperature == "std" else float(self.temperature)
            self._set_weights(energies, t)
        return self

    def _fit_auto(self, X: np.ndarray, y: np.ndarray) -> None:
        n = len(X)
        if n < 2:
            raise InputError("temperature='auto' needs at least 2 training samples (a validation split)")
        n_val = min(n - 1, max(1, int(round(self.validation_fraction * n))))
        order = np.random.default_rng(np.random.SeedSequence([int(self.random_state), 1])).permutation(n)
        fit_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
        fit_loss, _ = self._scan(X[fit_idx], y[fit_idx], want_loss=True)
        e_fit = fit_loss / len(fit_idx)
        grid = (gibbs.check_grid(self.temperature_grid) if self.temperature_grid is not None
                else gibbs.default_grid(e_fit))
        P = gibbs.weight_matrix(e_fit, grid)
        val_loss, (errors, logloss) = self._scan(X[val_idx], y[val_idx], P=P, want_loss=True, stats=True)
        t = gibbs.choose_temperature(grid, errors)
        self.validation_curve_ = {
            "temperatures": grid.tolist(),
            "error": (errors / n_val).tolist(),
            "loss": (logloss / n_val).tolist(),
            "n_fit": int(len(fit_idx)),
            "n_validation": int(n_val),
            "temperature_std_fit": gibbs.std_temperature(e_fit),
        }
        energies = (fit_loss + val_loss) / n if self.refit else e_fit
        self._set_weights(energies, t)

    def _set_weights(self, energies: np.ndarray, temperature: float) -> None:
        self.energies_ = np.asarray(energies, dtype=np.float64)
        self.temperature_ = float(temperature)
        self.temperature_std_ = gibbs.std_temperature(self.energies_)
        self.log_weights_ = gibbs.log_gibbs_weights(self.energies_, self.temperature_)
        self.weights_ = gibbs.quantize(np.exp(self.log_weights_))
        self.effective_size_ = gibbs.effective_size(self.log_weights_)

    # -- the one scanning loop (energies, votes, curve statistics) -----------------------------
    def _progress(self, iterable, length: int, label: str):
        if self.progress and length > 1 and sys.stderr.isatty():
            import click

            return click.progressbar(iterable, length=length, label=label, file=sys.stderr)
        return contextlib.nullcontext(iterable)

    def _scan(self, X: np.ndarray, y: np.ndarray | None = None, P: np.ndarray | None = None,
              want_loss: bool = False, stats: bool = False, keep_votes: bool = False):
        """One pass over X in sample chunks and member blocks.

        Returns (loss_sums (M,) or None, result) where result is (errors, logloss) per column of P when
        ``stats``, the votes (nT, S, K) when ``keep_votes``, else None.
        """
        bank = self.members_
        M, K = bank.n_members, self.n_classes_
        chunk = int(self.batch_size)
        block = member_block_size(bank, min(chunk, len(X)))
        loss_sums = np.zeros(M)
        n_t = 0 if P is None else P.shape[1]
        errors, logloss = np.zeros(n_t, np.int64), np.zeros(n_t)
        kept = []
        starts = range(0, len(X), chunk)
        with self._progress(starts, len(starts), "members x samples") as bar:
            for start in bar:
                x = X[start:start + chunk].astype(np.float64)
                if self.x_mean_ is not None:
                    x = x - self.x_mean_
                yc = None if y is None else y[start:start + chunk]
                if yc is None and (want_loss or stats):
                    raise InputError("the energies and the vote statistics need labels")
                hard = self.vote == "hard"
                if P is not None:  # hard votes: one (nT, S) slab per class but the last (see below)
                    votes = np.zeros((n_t, K - 1, len(x))) if hard else np.zeros((n_t, len(x) * K))
                for m0 in range(0, M, block):
                    sl = slice(m0, min(M, m0 + block))
                    z = logits(bank, x, sl)
                    labels = labels_from_logits(z) if (hard or self.energy == "zero-one") else None
                    if want_loss and yc is not None:
                        loss_sums[sl] += losses_from_logits(z, yc, self.energy, labels).sum(axis=1)
                    if P is not None and labels is not None and hard:
                        pt = P[sl].T
                        for k in range(K - 1):
                            votes[:, k, :] += pt @ (labels == k).astype(np.float64)
                    elif P is not None:
                        out = proba_from_logits(z)
                        votes += P[sl].T @ out.reshape(out.shape[0], -1)
                if P is not None and hard:
                    # the last class gets the rest of the total weight: sums of quantised weights are
                    # exact, so this equals the direct weighted count bit for bit
                    last = P.sum(axis=0)[:, None] - votes.sum(axis=1)
                    votes = np.concatenate([votes, last[:, None, :]], axis=1).transpose(0, 2, 1)
                elif P is not None:
                    votes = votes.reshape(n_t, len(x), K)
                if P is not None:
                    if stats and yc is not None:
                        wrong, loss = gibbs.vote_statistics(votes, yc)
                        errors += wrong
                        logloss += loss
                    if keep_votes:
                        kept.append(votes)
        losses = loss_sums if want_loss else None
        if stats:
            return losses, (errors, logloss)
        if keep_votes:
            return losses, np.concatenate(kept, axis=1)
        return losses, None

    # -- prediction ----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("this GibbsEnsemble is not fitted yet; call fit(X, y) first")

    def votes(self, X, weights=None) -> np.ndarray:
        """Weighted votes (S, K) in float64 (exact sums of the quantised weights for hard votes).

        ``weights``: other member weights, (M,) or (M, n) for n weightings in one pass (votes then
        (n, S, K)); pass them through ``gibbs.quantize`` to keep hard votes exact.
        """
        self._check_fitted()
        X = check_features(X, self.n_features_in_)
        w = self.weights_ if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape[0] != self.members_.n_members or w.ndim not in (1, 2):
            raise InputError(f"weights must have shape ({self.members_.n_members},) or ({self.members_.n_members}, n), "
                             f"got {list(w.shape)}")
        _, votes = self._scan(X, P=w.reshape(len(w), -1), keep_votes=True)
        return votes[0] if w.ndim == 1 else votes

    def predict_proba(self, X) -> np.ndarray:
        """Weighted probabilities (or vote shares), rows sum to 1 (float64)."""
        return self.votes(X)  # the quantised weights sum to 1 within M * 2^-51, as in the exported graph

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.votes(X), axis=1)

    def score(self, X, y) -> float:
        X = check_features(X, getattr(self, "n_features_in_", None))
        y = check_labels(y, len(X), getattr(self, "n_classes_", None))
        return float(np.mean(self.predict(X) == y))

    def member_predictions(self, X) -> np.ndarray:
        """Every member's predicted class (M, S)."""
        self._check_fitted()
        X = check_features(X, self.n_features_in_).astype(np.float64)
        if self.x_mean_ is not None:
            X = X - self.x_mean_
        bank = self.members_
        block = member_block_size(bank, len(X))
        return np.concatenate([labels_from_logits(logits(bank, X, slice(m0, m0 + block)))
                               for m0 in range(0, bank.n_members, block)], axis=0)

    # -- temperature curves --------------------------------------------------------------------
    def temperature_curve(self, X, y, temperatures=None) -> dict:
        """Accuracy, error, log loss and effective size per temperature on (X, y), with the limits
        T -> 0 (best member) and T -> inf (uniform average) under ``best_member`` and ``uniform``."""
        self._check_fitted()
        X = check_features(X, self.n_features_in_)
        y = check_labels(y, len(X), self.n_classes_)
        temps = (gibbs.default_grid(self.energies_) if temperatures is None
                 else gibbs.check_grid(temperatures, allow_limits=True))
        all_t = list(temps) + [0.0, math.inf]
        P = gibbs.weight_matrix(self.energies_, all_t)
        _, (errors, logloss) = self._scan(X, y, P=P, stats=True)
        n = len(X)
        sizes = [gibbs.effective_size(gibbs.log_gibbs_weights(self.energies_, t)) for t in all_t]

        def entry(i: int) -> dict:
            return {"accuracy": 1 - errors[i] / n, "error": errors[i] / n, "loss": logloss[i] / n,
                    "effective_size": sizes[i]}

        nt = len(temps)
        curve = {
            "temperatures": temps.tolist(),
            "accuracy": (1 - errors[:nt] / n).tolist(),
            "error": (errors[:nt] / n).tolist(),
            "loss": (logloss[:nt] / n).tolist(),
            "effective_size": sizes[:nt],
            "best_member": entry(nt),
            "uniform": entry(nt + 1),
            "n_samples": n,
            "n_members": self.members_.n_members,
            "temperature": self.temperature_,
            "temperature_std": self.temperature_std_,
        }
        finite = [i for i, t in enumerate(temps) if 0 < t < math.inf]
        if finite:
            best = min(finite, key=lambda i: (errors[i], i))
            curve["optimum"] = {"temperature": float(temps[best]), **entry(best)}
        return curve

    # -- dropping members ----------------------------------------------------------------------
    def select_members(self, index) -> GibbsEnsemble:
        """A copy with only the members selected by ``index`` (mask or indices), weights renormalised."""
        self._check_fitted()
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.size == 0:
            raise InputError("no members selected")
        new = GibbsEnsemble(**self.get_params())
        for name, value in self.__dict__.items():
            if name.endswith("_") and not name.startswith("_"):
                setattr(new, name, value)
        new.__dict__.pop("dropped_", None)
        new.n_members = int(index.size)
        new.members_ = self.members_.subset(index)
        new.energies_ = self.energies_[index]
        lw = self.log_weights_[index]
        new.log_weights_ = lw - gibbs.logsumexp(lw)
        new.weights_ = gibbs.quantize(np.exp(new.log_weights_))
        new.effective_size_ = gibbs.effective_size(new.log_weights_)
        return new

    def drop_members(self, threshold: float) -> GibbsEnsemble:
        """A copy keeping the members whose weight is >= ``threshold``, weights renormalised; the
        counts are in its ``dropped_`` attribute."""
        self._check_fitted()
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise InputError(f"the drop threshold must be a number, got {threshold!r}") from None
        if not (0 <= threshold <= 1):
            raise InputError(f"the drop threshold must be between 0 and 1, got {threshold}")
        p = np.exp(self.log_weights_)
        keep = p >= threshold
        if not keep.any():
            raise InputError(f"threshold {threshold:g} drops every member (the largest weight is {p.max():.3g})")
        new = self.select_members(keep)
        new.dropped_ = {"members_total": int(len(keep)), "members_kept": int(keep.sum()),
                        "weight_dropped": float(p[~keep].sum()), "threshold": threshold}
        return new

    def summary(self) -> dict:
        self._check_fitted()
        return {
            "members": self.members_.n_members, "kind": self.kind, "classes": self.n_classes_,
            "features": self.n_features_in_, "energy": self.energy, "vote": self.vote,
            "temperature": self.temperature_, "temperature_rule": str(self.temperature),
            "temperature_std": self.temperature_std_, "effective_size": self.effective_size_,
            "energy_min": float(self.energies_.min()), "energy_mean": float(self.energies_.mean()),
            "energy_std": float(self.energies_.std()), "n_train": self.n_train_,
            "parameters": self.members_.n_parameters(),
        }


__all__ = ["GibbsEnsemble", "MemberBank"]
