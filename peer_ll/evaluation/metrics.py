"""Forgetting, plasticity and routing metrics as pure functions.

Accuracy-matrix metrics take ``R`` of shape (T, T), where ``R[i][j]`` is the
score on experience j after training on experience i (0-based, T experiences).
The score is an accuracy, or a perplexity with ``higher_is_better=False``.

Sign conventions, identical for both kinds of score:
- ``bwt`` and ``fwt`` are positive when the score got *better* (accuracy up,
  perplexity down);
- ``forgetting``, ``intransigence`` and ``relative_increase`` are positive
  when the score got *worse* (accuracy down, perplexity up).
Internally a perplexity matrix is negated, so that "better" is always "higher".
``average_accuracy`` and ``learning_accuracy`` are plain means of scores; for
them the flag changes nothing.

NaN marks an entry that was never evaluated. A metric that needs such an entry
returns NaN rather than quietly averaging fewer values. The one exception is the
best-so-far score in ``forgetting(kind="max")``, which skips NaN entries,
because scores on experience j before training on it are often not evaluated.
A mean over nothing (bwt or forgetting with T = 1, fwt with T = 1) is 0.0, as
Avalanche's ``Mean`` reports it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = [
    "average_accuracy",
    "bwt",
    "dead_unit_fraction",
    "effective_rank",
    "forgetting",
    "forgetting_per_experience",
    "fwt",
    "intransigence",
    "learning_accuracy",
    "relative_increase",
    "routing_share",
]


def _as_array(x: Any, name: str) -> np.ndarray:
    """Converts a list, numpy array or torch tensor to a float64 numpy array."""
    if hasattr(x, "detach"):  # a torch tensor; torch itself is not imported here
        x = x.detach().to("cpu").double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}") from err


def _as_matrix(R: Any, name: str = "R") -> np.ndarray:
    """Validates a square (T, T) score matrix with T >= 1."""
    m = _as_array(R, name)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square 2-D matrix of shape (T, T), got shape {m.shape}"
        )
    return m


def _oriented(R: Any, higher_is_better: bool) -> np.ndarray:
    """Returns the score matrix with the sign flipped so that higher is better."""
    m = _as_matrix(R)
    return m if higher_is_better else -m


def _mean(values: np.ndarray) -> float:
    """Mean that propagates NaN and is 0.0 over an empty set (Avalanche's Mean)."""
    return float(values.mean()) if values.size else 0.0


def average_accuracy(R: Any, *, higher_is_better: bool = True) -> float:
    """Mean score on all experiences after the last one: mean of ``R[T-1]``.

    Args:
        R: (T, T) score matrix.
        higher_is_better: Accepted for a uniform signature; it does not change
            a plain mean of scores.

    Returns:
        The average final score.
    """
    return float(_as_matrix(R)[-1].mean())


def learning_accuracy(R: Any, *, higher_is_better: bool = True) -> float:
    """Plasticity: mean score right after training on each experience.

    Mean of the diagonal ``R[i][i]``. ``higher_is_better`` changes nothing.
    """
    return float(np.diag(_as_matrix(R)).mean())


def bwt(R: Any, *, higher_is_better: bool = True) -> float:
    """Backward transfer: mean over i < T-1 of ``R[T-1][i] - R[i][i]``.

    With ``higher_is_better=False`` the difference is ``R[i][i] - R[T-1][i]``,
    so a positive value always means later training improved old experiences.
    For accuracies it is minus ``forgetting(R, kind="first")``.
    """
    q = _oriented(R, higher_is_better)
    t = q.shape[0]
    return _mean(q[-1, : t - 1] - np.diag(q)[: t - 1])


def fwt(R: Any, b: Any, *, higher_is_better: bool = True) -> float:
    """Forward transfer: mean over i >= 1 of ``R[i-1][i] - b[i]``.

    Args:
        R: (T, T) score matrix.
        b: (T,) scores of the model at initialisation, before any training.
        higher_is_better: With False (perplexity) the difference is
            ``b[i] - R[i-1][i]``; positive always means earlier training helped.

    Returns:
        The forward transfer.
    """
    q = _oriented(R, higher_is_better)
    t = q.shape[0]
    init = _as_array(b, "b")
    if init.shape != (t,):
        raise ValueError(f"b must have shape ({t},) to match R, got shape {init.shape}")
    init = init if higher_is_better else -init
    return _mean(q[np.arange(t - 1), np.arange(1, t)] - init[1:])


def forgetting_per_experience(
    R: Any, *, kind: Literal["max", "first"] = "max", higher_is_better: bool = True
) -> np.ndarray:
    """Forgetting of each experience j < T-1, shape (T-1,).

    - ``kind="max"`` (Chaudhry et al. 2018): ``max_{l < T-1} R[l][j] - R[T-1][j]``.
      The max runs over every l < T-1, including l < j; NaN entries are skipped.
    - ``kind="first"`` (Avalanche's ``ExperienceForgetting``): ``R[j][j] - R[T-1][j]``.

    With ``higher_is_better=False`` (perplexity) both become increases:
    ``R[T-1][j] - min_{l < T-1} R[l][j]`` and ``R[T-1][j] - R[j][j]``.
    """
    q = _oriented(R, higher_is_better)
    t = q.shape[0]
    last = q[-1, : t - 1]
    if kind == "first":
        return np.diag(q)[: t - 1] - last
    if kind == "max":
        past = q[: t - 1, : t - 1]
        best = np.where(np.isnan(past), -np.inf, past).max(axis=0, initial=-np.inf)
        best = np.where(np.isneginf(best), np.nan, best)
        return best - last
    raise ValueError(f"kind must be 'max' or 'first', got {kind!r}")


def forgetting(
    R: Any, *, kind: Literal["max", "first"] = "max", higher_is_better: bool = True
) -> float:
    """Mean forgetting over experiences j < T-1 (see ``forgetting_per_experience``).

    ``kind="first"`` equals Avalanche's ``StreamForgetting`` after the last
    training experience, when every evaluation covers the whole test stream:
    Avalanche averages ``initial - last`` over the experiences trained before the
    current one, and reports 0.0 when there is none.
    """
    return _mean(forgetting_per_experience(R, kind=kind, higher_is_better=higher_is_better))


def intransigence(R: Any, R_joint: Any, *, higher_is_better: bool = True) -> float:
    """Chaudhry et al. 2018 intransigence: mean over k of ``a*_k - R[k][k]``.

    Args:
        R: (T, T) score matrix of the continual learner.
        R_joint: the joint-training reference ``a*``: either a (T,) vector of
            per-experience scores of a model trained jointly on all data, or a
            (T', T) matrix from an (incremental) joint-training run, whose last
            row is used.
        higher_is_better: With False (perplexity) the gap is ``R[k][k] - a*_k``.

    Returns:
        The mean gap; positive means the learner could not reach joint scores.
    """
    q = _oriented(R, higher_is_better)
    t = q.shape[0]
    ref = _as_array(R_joint, "R_joint")
    if ref.ndim == 2 and ref.shape[1] == t and ref.shape[0] >= 1:
        ref = ref[-1]
    if ref.shape != (t,):
        raise ValueError(
            f"R_joint must have shape ({t},) or (n, {t}) to match R, got shape {ref.shape}"
        )
    ref = ref if higher_is_better else -ref
    return float((ref - np.diag(q)).mean())


def relative_increase(R: Any, *, higher_is_better: bool = False) -> float:
    """Forgetting as a relative change, for perplexity.

    Mean over j < T-1 of ``(R[T-1][j] - R[j][j]) / R[j][j]``: 0.25 means the
    final perplexity on experience j is 25 % above the one right after training
    on it. The default is ``higher_is_better=False`` because this metric is meant
    for perplexity; with True it is the relative drop
    ``(R[j][j] - R[T-1][j]) / R[j][j]``. Positive always means forgetting.

    Raises:
        ValueError: if a diagonal entry used as denominator is 0.
    """
    m = _as_matrix(R)
    t = m.shape[0]
    first, last = np.diag(m)[: t - 1], m[-1, : t - 1]
    if np.any(first == 0):
        raise ValueError(f"R[j][j] must be non-zero for j < T-1, got diagonal {np.diag(m)}")
    change = (first - last) if higher_is_better else (last - first)
    return _mean(change / first)


# ---- PEER routing share (usage, unevenness: peer_ll.experts) --------------


def _as_mass(mass: Any) -> np.ndarray:
    m = _as_array(mass, "mass")
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"mass must be a non-empty 1-D array (N,), got shape {m.shape}")
    if np.isnan(m).any() or (m < 0).any():
        raise ValueError("mass must be finite and non-negative, got NaN or negative entries")
    return m


def routing_share(mass: Any, owners: Any) -> dict[int, float]:
    """Fraction of the router mass that falls on the experts of each owner.

    Args:
        mass: (N,) accumulated router mass per expert, e.g. over the inputs of
            one experience.
        owners: (N,) integer owner id (task or experience) of each expert row.

    Returns:
        ``{owner: share}`` for every owner id present in ``owners``, in
        ascending order; shares sum to 1 (an owner with no mass gets 0.0).
    """
    m = _as_mass(mass)
    o = np.asarray(owners.detach().cpu() if hasattr(owners, "detach") else owners)
    if o.shape != m.shape or not np.issubdtype(o.dtype, np.integer):
        raise ValueError(
            f"owners must be an integer array of shape {m.shape} like mass; "
            f"got dtype {o.dtype}, shape {o.shape}"
        )
    total = m.sum()
    if total == 0:
        raise ValueError("mass must have a positive sum, got all zeros")
    ids, inverse = np.unique(o, return_inverse=True)
    shares = np.bincount(inverse, weights=m, minlength=ids.size) / total
    return {int(i): float(s) for i, s in zip(ids, shares, strict=True)}


# ---- plasticity health (Dohare et al. 2024) ---------------------------------


def _as_features(features: Any) -> np.ndarray:
    f = _as_array(features, "features")
    if f.ndim != 2 or 0 in f.shape:
        raise ValueError(
            f"features must be a non-empty 2-D array (n_samples, n_units), got shape {f.shape}"
        )
    return f


def dead_unit_fraction(features: Any, *, threshold: float = 0.0, atol: float = 0.0) -> float:
    """Fraction of units that never activate on the given samples.

    A unit is dead if its post-activation value is ``<= threshold + atol`` for
    every sample (Dohare et al. 2024 count ReLU units that output 0). For GELU,
    whose output is slightly non-zero near 0, pass a small ``atol`` (e.g. 1e-3).

    Args:
        features: (n_samples, n_units) post-activation values.
        threshold: activation at or below which a unit counts as inactive.
        atol: extra tolerance added to ``threshold``.
    """
    f = _as_features(features)
    return float(np.all(f <= threshold + atol, axis=0).mean())


def effective_rank(features: Any) -> float:
    """Effective rank (Roy & Vetterli 2007), as Dohare et al. 2024 use it.

    ``exp(-sum_k p_k log p_k)`` with ``p = sigma / sum(sigma)``, the singular
    values of ``features`` normalised to sum to 1 (``0 log 0 = 0``). It lies in
    [1, min(n_samples, n_units)] for a non-zero matrix; an all-zero matrix
    has effective rank 0.0.

    Args:
        features: (n_samples, n_units) representation matrix.
    """
    sigma = np.linalg.svd(_as_features(features), compute_uv=False)
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
