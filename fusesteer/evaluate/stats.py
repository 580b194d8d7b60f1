"""Small statistics for evaluation and benchmarks.

* :func:`wilson_ci` — Wilson score interval of a proportion k/n (``scipy.stats.binomtest(...).proportion_ci``).
* :func:`mcnemar_p` — exact (binomial) two-sided McNemar test on paired outcomes (``scipy.stats.binomtest``).
* :func:`bootstrap_ci` — percentile bootstrap interval of a statistic (median by default).
* :func:`paired_bootstrap_diff` — paired bootstrap of the accuracy difference of two systems
  scored on the same items.

The bootstrap stays here rather than ``scipy.stats.bootstrap``: that draws its resamples in another order, so
its percentile intervals differ from these (seeded, reproducible, vectorised) ones by resampling noise, and
the recorded benchmark intervals would move. This module checks its inputs and gives :class:`StatsError`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import FuseSteerError

__all__ = ["StatsError", "Interval", "wilson_ci", "bootstrap_ci", "paired_bootstrap_diff", "mcnemar_p"]


class StatsError(FuseSteerError, ValueError):
    """Bad input to a statistics function."""


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes out of ``n`` (z=1.96: 95%)."""
    for nm, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise StatsError(f"wilson_ci: {nm} must be an integer, got {v!r}")
    if n <= 0:
        raise StatsError(f"wilson_ci: n must be positive, got {n}")
    if not 0 <= k <= n:
        raise StatsError(f"wilson_ci: k must be in [0, n={n}], got {k}")
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
        raise StatsError(f"wilson_ci: z must be a positive number, got {z!r}")
    from scipy.stats import norm

    ci = _binomtest(k, n).proportion_ci(confidence_level=float(2 * norm.cdf(z) - 1), method="wilson")
    # exact endpoints at the boundaries (avoid -1e-17 style rounding)
    return (0.0 if k == 0 else max(0.0, float(ci.low))), (1.0 if k == n else min(1.0, float(ci.high)))


def _binomtest(k: int, n: int, p: float = 0.5):
    try:
        from scipy.stats import binomtest
    except ImportError:  # pragma: no cover - scipy comes with the methods extra
        raise StatsError("these statistics need scipy: pip install 'fusesteer[methods]'") from None
    return binomtest(int(k), int(n), p)


_VECTOR_STATS = {"median": np.median, "mean": np.mean}


def _resolve_stat(stat) -> tuple[Callable, Callable | None]:
    """(scalar stat, vectorised stat over axis=1 or None)."""
    if isinstance(stat, str):
        if stat not in _VECTOR_STATS:
            raise StatsError(f"stat must be a callable or one of {sorted(_VECTOR_STATS)}, got {stat!r}")
        f = _VECTOR_STATS[stat]
        return f, lambda x: f(x, axis=1)
    if not callable(stat):
        raise StatsError(f"stat must be callable, got {type(stat).__name__}")
    import statistics

    if stat in (np.median, statistics.median):
        return stat, lambda x: np.median(x, axis=1)
    if stat in (np.mean, statistics.mean, statistics.fmean):
        return stat, lambda x: np.mean(x, axis=1)
    return stat, None


def _as_1d(values, name: str) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise StatsError(f"{name} must be a sequence of numbers") from None
    if a.ndim != 1 or a.size == 0:
        raise StatsError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise StatsError(f"{name} contains NaN or infinite values")
    return a


def _check_boot(n_boot, alpha):
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise StatsError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise StatsError(f"alpha must be in (0, 1), got {alpha!r}")


def _resample_stats(a: np.ndarray, scalar: Callable, vector: Callable | None, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = a.size
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bound memory of the index matrix
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        samples = a[idx]
        if vector is not None:
            out[s : s + m] = vector(samples)
        else:
            out[s : s + m] = [float(scalar(row)) for row in samples]
    return out


def bootstrap_ci(values: Sequence[float], stat: Callable | str = np.median, n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> Interval:
    """Percentile bootstrap: ``Interval(estimate=stat(values), low, high)`` at level ``1 - alpha``.

    ``stat`` is a callable on a 1-D array (``np.median``, ``np.mean`` and their ``statistics``
    counterparts, or "median"/"mean", are vectorised). Deterministic for a given ``seed``.
    """
    a = _as_1d(values, "values")
    _check_boot(n_boot, alpha)
    scalar, vector = _resolve_stat(stat)
    est = float(scalar(a))
    boots = _resample_stats(a, scalar, vector, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Interval(est, float(lo), float(hi))


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a = _as_1d(a_correct, "a_correct")
    b = _as_1d(b_correct, "b_correct")
    if a.size != b.size:
        raise StatsError(f"a_correct and b_correct must score the same items: lengths {a.size} != {b.size}")
    for nm, v in (("a_correct", a), ("b_correct", b)):
        if not np.all((v == 0) | (v == 1)):
            raise StatsError(f"{nm} must hold booleans / 0-1 values")
    return a, b


def paired_bootstrap_diff(a_correct: Sequence[bool], b_correct: Sequence[bool], n_boot: int = 2000, seed: int = 0,
                          alpha: float = 0.05) -> Interval:
    """Accuracy difference ``mean(a) - mean(b)`` of two systems on the same items, with a paired
    percentile bootstrap interval (items are resampled together, keeping the pairing)."""
    a, b = _paired(a_correct, b_correct)
    _check_boot(n_boot, alpha)
    d = a - b
    boots = _resample_stats(d, np.mean, lambda x: np.mean(x, axis=1), n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Interval(float(d.mean()), float(lo), float(hi))


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value: with ``n01`` items only ``a`` gets right and ``n10`` only
    ``b``, ``p = min(1, 2 * P[Binomial(n01 + n10, 1/2) <= min(n01, n10)])``; 1.0 when they never differ."""
    a, b = _paired(a_correct, b_correct)
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    n = only_a + only_b
    if n == 0:
        return 1.0
    # two-sided exact test at p = 1/2: min(1, 2 * P[Binomial(n, 1/2) <= min(n01, n10)])
    return float(_binomtest(only_a, n).pvalue)
