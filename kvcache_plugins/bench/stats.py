"""95% intervals for benchmark scores: Wilson for exact match (0/1 per prompt), bootstrap over prompts otherwise.

A score is the mean of one value per prompt. With a few dozen prompts a single row moves by several points between
samples, so every score the benchmark prints carries an interval:

* :func:`wilson_interval` for a proportion (exact match): ``k`` successes out of ``n`` prompts,
  ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n`` and ``z = 1.96``. Unlike the normal
  approximation it stays inside [0, 1] and does not collapse to a point at 0% or 100%.
* :func:`bootstrap_interval` for a mean of graded values (F1, partial credit): the 2.5th and 97.5th percentiles of
  the means of ``resamples`` resamples of the prompts, drawn with replacement from a seeded generator.

:func:`score_interval` picks the one that fits the values; :func:`format_interval` writes ``0.750 ±0.09``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% for the default ``z``)."""
    if isinstance(successes, bool) or not isinstance(successes, int) or isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"successes and n must be ints, got {type(successes).__name__} and {type(n).__name__}")
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at p = 0 or 1 the bound is exactly 0 or 1; rounding must not put the score outside its interval
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt), seeded: reproducible."""
    n = len(values)
    if n == 0:
        raise ValueError("need at least one value for an interval")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    mean = sum(values) / n
    # the percentile interval of a skewed mean can miss the mean by a rounding step; the row's score stays inside
    return min(low, mean), max(high, mean)


def score_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% interval of the mean of per-prompt ``values``: Wilson when every value is 0 or 1, else bootstrap."""
    if len(values) == 0:
        raise ValueError("need at least one value for an interval")
    if all(v in (0, 1) for v in values):
        return wilson_interval(int(sum(values)), len(values))
    return bootstrap_interval(values)


def format_interval(score: float, interval: Sequence[float]) -> str:
    """``0.750 ±0.09``: the score and half the width of its interval (the bounds themselves are in results.json;
    a Wilson interval near 0 or 1 is not symmetric about the score)."""
    low, high = interval
    return f"{score:.3f} ±{(high - low) / 2:.2f}"
