"""`accuracy_change`: the top-1 change from a dense model to its pruned form, with its
paired 95 % interval (exact McNemar test on the same test images).

Both models classify the same ``n`` images. Only the discordant images carry information
about the change: ``b`` images the dense model gets right and the pruned one wrong, ``c``
the other way round, ``m = b + c``. The change in points is::

    change = 100 * (c - b) / n

Conditional on ``m``, ``c ~ Binomial(m, p)`` with ``p`` the share of discordant images the
pruned model wins, and ``change = 100 * m * (2 p - 1) / n`` (McNemar 1947). The interval is
the Clopper-Pearson (1934) interval of ``p`` mapped through that line::

    p_low  = the p with P(Binomial(m, p) >= c) = alpha / 2     (0 when c = 0)
    p_high = the p with P(Binomial(m, p) <= c) = alpha / 2     (1 when c = m)
    [low, high] = 100 * m * (2 * [p_low, p_high] - 1) / n

and the exact two-sided McNemar p-value is ``min(1, 2 * min(P(X <= c), P(X >= c)))``,
``X ~ Binomial(m, 1/2)``. Being conditional on ``m``, the interval is ``[0, 0]`` when the
two models agree on every image; it contains 0 exactly when the test does not reject
"no change" at level ``alpha`` (both are tail probabilities of the same binomial).
"""
import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AccuracyChange:
    """Top-1 change (points) with its interval; ``dense_only``/``pruned_only`` count the
    images only the dense / only the pruned model classifies correctly (``b``, ``c``)."""
    change: float
    low: float
    high: float
    p_value: float
    dense_only: int
    pruned_only: int
    images: int
    confidence: float = 0.95

    def __str__(self):
        return (f"{self.change:+.2f} points [{self.low:+.2f}, {self.high:+.2f}] "
                f"({100 * self.confidence:g} % interval, exact McNemar p = {self.p_value:.3g}; "
                f"{self.dense_only} images only dense gets right, {self.pruned_only} only "
                f"pruned, of {self.images})")

    def to_dict(self):
        return dataclasses.asdict(self)


def binomial_cdf(k, m, p):
    """``P(Binomial(m, p) <= k)``, summed in log space (exact up to rounding)."""
    if k < 0:
        return 0.0
    if k >= m or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    logs = (math.lgamma(m + 1) - np.array([math.lgamma(j + 1) + math.lgamma(m - j + 1) for j in i])
            + i * math.log(p) + (m - i) * math.log1p(-p))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def _solve(f, target):
    """The p in [0, 1] with ``f(p) = target`` for a decreasing ``f``, by bisection."""
    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if f(middle) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson(c, m, confidence=0.95):
    """The exact (Clopper-Pearson) interval of a binomial proportion: ``c`` of ``m``."""
    tail = (1 - confidence) / 2
    low = 0.0 if c == 0 else _solve(lambda p: binomial_cdf(c - 1, m, p), 1 - tail)
    high = 1.0 if c == m else _solve(lambda p: binomial_cdf(c, m, p), tail)
    return low, high


def _classes(name, values, n=None):
    values = np.asarray(values)
    if values.ndim == 2:  # logits or probabilities: the top-1 class
        values = np.argmax(values, axis=1)
    if values.ndim != 1 or (n is not None and len(values) != n):
        raise ValueError(f"{name}: expected {n or 'N'} class indices (or an N x classes array "
                         f"of scores), got shape {values.shape}; give predictions of the same "
                         "images in the same order as the labels.")
    return values


def accuracy_change(dense_predictions, pruned_predictions, labels, confidence=0.95):
    """The top-1 change from the dense to the pruned model on the same images, with its
    paired interval from the exact McNemar test (the formula is in the module docstring).

    Each of ``dense_predictions`` and ``pruned_predictions`` is N class indices or an
    N x classes array of scores (its argmax is taken); ``labels`` is N class indices.

    Examples:
      >>> change = tf_stdprune.accuracy_change(dense.predict(x), pruned.predict(x), y)
      >>> print(change)   # -0.83 points [-2.10, +0.28] (95 % interval, exact McNemar p = ...)
    """
    labels = _classes("labels", labels)
    n = len(labels)
    if n == 0:
        raise ValueError("labels: no images; give the labels of at least one test image.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: give a level in (0, 1), e.g. 0.95.")
    dense = _classes("dense_predictions", dense_predictions, n) == labels
    pruned = _classes("pruned_predictions", pruned_predictions, n) == labels
    b, c = int(np.sum(dense & ~pruned)), int(np.sum(pruned & ~dense))
    m = b + c
    p_low, p_high = clopper_pearson(c, m, confidence) if m else (0.5, 0.5)
    p_value = min(1.0, 2 * min(binomial_cdf(c, m, 0.5), 1 - binomial_cdf(c - 1, m, 0.5)))
    scale = 100.0 * m / n
    return AccuracyChange(100.0 * (c - b) / n, scale * (2 * p_low - 1), scale * (2 * p_high - 1),
                          p_value, b, c, n, confidence)
