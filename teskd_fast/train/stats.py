"""Statistics of a comparison over seeds: mean, sample standard deviation, Student's t on paired differences.

No SciPy: the t quantile is found by bisection on the t distribution's CDF, which is a regularised incomplete
beta function evaluated by its continued fraction (Lentz's method), accurate to about 1e-14.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; ``values`` must not be empty."""
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """The sample standard deviation (divisor n - 1); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Numerical Recipes' ``betacf``, modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t distribution with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The quantile of Student's t: the ``t`` with ``P(T <= t) = p`` (``t_ppf(0.975, 4)`` = 2.776)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError(f"t_ppf: no quantile found for p={p}, df={df}")
    # Bisection to the resolution of a double: the CDF is increasing, so this cannot fail to converge.
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """A paired difference ``a - b`` over n seeds and its two-sided Student's t confidence interval.

    ``low``, ``high`` and ``t_critical`` are NaN for fewer than two pairs (no spread to estimate).
    """

    n: int
    mean: float
    std: float
    sem: float
    t_critical: float
    confidence: float
    low: float
    high: float

    @property
    def defined(self) -> bool:
        """Whether the interval exists (at least two pairs)."""
        return self.n >= 2

    @property
    def contains_zero(self) -> bool | None:
        """Whether 0 lies in the closed interval; None when the interval is not defined."""
        if not self.defined:
            return None
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contains_zero": self.contains_zero}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The mean of ``a[i] - b[i]`` with its ``confidence`` interval from Student's t on the n - 1 df.

    Args:
        a: one value per seed of the first method (TESKD).
        b: the second method's values, in the same seed order (the baseline).
        confidence: the interval's coverage, e.g. 0.95.

    Returns:
        a :class:`PairedDifference`: ``mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n)``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}")
    if not a:
        raise ValueError("paired_difference: no pairs")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n, m, s = len(diffs), mean(diffs), std(diffs)
    if n < 2:
        return PairedDifference(n, m, math.nan, math.nan, math.nan, confidence, math.nan, math.nan)
    sem = s / math.sqrt(n)
    t = t_ppf(0.5 * (1.0 + confidence), n - 1)
    return PairedDifference(n, m, s, sem, t, confidence, m - t * sem, m + t * sem)


# Differences whose standard deviation is below this fraction of their size (at least 1) have no spread: the same
# difference on every seed, up to the rounding of the subtraction (99.17 - 98.89 is not exactly 0.28).
NO_SPREAD = 1e-9


def has_spread(d: PairedDifference) -> bool:
    """Whether the differences vary (at least two finite ones whose std is not zero up to rounding): the t-test
    needs their spread, and differences that do not vary give no estimate of it."""
    return d.defined and math.isfinite(d.std) and d.std > NO_SPREAD * max(1.0, abs(d.mean))


def paired_p_value(d: PairedDifference) -> float:
    """The two-sided p-value of Student's paired t-test of ``d.mean == 0``; NaN where the test is undefined: fewer
    than two pairs, or no spread (:func:`has_spread`: t would be 0/0 or infinite)."""
    if not has_spread(d):
        return math.nan
    return min(1.0, 2.0 * (1.0 - t_cdf(abs(d.mean) / d.sem, d.n - 1)))


def mean_interval(values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) \
        -> tuple[float, float] | None:
    """The Student's t ``confidence`` interval of the mean of ``values`` (None for fewer than two), clipped to
    ``bounds`` (e.g. ``(0, 100)`` for an accuracy in %, whose mean cannot lie outside)."""
    n = len(values)
    if n < 2:
        return None
    m, half = mean(values), t_ppf(0.5 * (1.0 + confidence), n - 1) * std(values) / math.sqrt(n)
    return clip((m - half, m + half), bounds)


def clip(interval: tuple[float, float], bounds: tuple[float, float] | None) -> tuple[float, float]:
    """``interval`` inside ``bounds`` (None: unchanged)."""
    if bounds is None:
        return interval
    lo, hi = bounds
    return min(max(interval[0], lo), hi), max(min(interval[1], hi), lo)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (NaN stays NaN and is not counted): the adjusted p of the i-th
    smallest is ``max over j <= i of min(1, (m - j + 1) * p_(j))``; reject where it is below the level."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m, adjusted, running = len(order), [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
