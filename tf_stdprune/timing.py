"""Fair timings of several contenders: interleaved rounds and per-round ratios with a
distribution-free interval. The benchmarks (``benchmarks/common.py``) and the exported
forms' comparison (`tf_stdprune.compression.forms`) measure with these."""
import math
import statistics
import time


def interleaved_samples(contenders, rounds, warmup=1, clock=time.perf_counter):
    """Seconds per call of each contender in every round, run in turn, the order rotated
    from round to round (a, b, c, b, c, a, c, a, b, ...).

    Interleaving spreads the machine's noise (about 5 % here) evenly over the
    contenders, so their ratios are fair even when absolute times drift; rotating gives
    each the same share of every position in a round (first after another's run, ...). With
    ``clock=time.process_time`` the CPU seconds of this process (all its threads) are
    measured instead of wall time: steadier when other processes share the machine.

    Examples:
      >>> samples = interleaved_samples({"a": run_a, "b": run_b}, rounds=9)
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            contenders[name]()
            samples[name].append(clock() - start)
    return samples


def ratio(a, b):
    """``a / b``; counts (page faults) may be 0: ``0 / 0 = 1``, ``a / 0 = inf``."""
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def paired_ratio(numerator, denominator, confidence=0.95):
    """Median of the per-round ratios ``numerator[i] / denominator[i]``, with its interval.

    Both contenders ran in the same round, seconds apart, so a ratio cancels the drift
    that separate medians keep. The interval is the distribution-free one for a median:
    order statistics ``r[k-1]`` and ``r[n-k]`` of the ``n`` sorted ratios, ``k`` the
    largest with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2`` (a sign test: an
    interval that excludes 1 means one contender is faster in significantly more rounds).
    With too few rounds for that confidence it spans the smallest to the largest ratio.
    A round where both are 0 (a count, not a time) has ratio 1, one where only the
    denominator is 0 has ratio ``inf``.

    Returns ``(median, low, high)``.

    Examples:
      >>> median, low, high = paired_ratio(samples["b"], samples["a"])
    """
    ratios = sorted(ratio(a, b) for a, b in zip(numerator, denominator))
    n = len(ratios)
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2 ** n <= (1 - confidence) / 2:
        below += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return statistics.median(ratios), ratios[k - 1], ratios[n - k]
