"""Shared measurement helpers: interleaved contenders, medians, paired ratios, JSON + table."""
import json
import math
import re
import resource
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


def minor_page_faults():
    """Minor page faults of this process so far: a ``clock`` for `interleaved_samples`
    that counts the pages of fresh memory the kernel mapped in (4 KiB each on x86-64), not
    time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
    """
    ratios = sorted(_ratio(a, b) for a, b in zip(numerator, denominator))
    n = len(ratios)
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2 ** n <= (1 - confidence) / 2:
        below += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return statistics.median(ratios), ratios[k - 1], ratios[n - k]


def report(title, config, samples, baseline, unit_scale=1000.0, unit="ms", items=None,
           pairs=()):
    """Prints the results as one JSON object, then as a table with ratios to ``baseline``.

    ``samples`` maps each contender to its seconds per round (`interleaved_samples`).
    Each row has the median, the ratio of medians to ``baseline`` and the per-round
    `paired_ratio` to it with its 95 % interval; with ``items`` (e.g. images per call)
    also ``items_per_s``. Each ``(a, b)`` of ``pairs`` adds the paired ratio ``a / b``.
    """
    medians = {name: statistics.median(times) for name, times in samples.items()}
    rows = {}
    for name, t in medians.items():
        rows[name] = {f"median_{unit}": t * unit_scale,
                      f"ratio_vs_{baseline}": _ratio(t, medians[baseline]),
                      f"paired_ratio_vs_{baseline}": paired_ratio(samples[name], samples[baseline])}
        if items:
            rows[name]["items_per_s"] = items / t
    paired = {f"{a} / {b}": paired_ratio(samples[a], samples[b]) for a, b in pairs}
    print(json.dumps({"benchmark": title, "config": config, "results": rows, "paired": paired},
                     indent=2))
    print(f"\n{title}  ({', '.join(f'{k}={v}' for k, v in config.items())})")
    ratio_width = max(14, len(baseline) + 2)
    print(f"{'contender':<24} {'median ' + unit:>12} {'x ' + baseline:>{ratio_width}} "
          f"{'per round [95 % interval]':>28} {'items/s':>10}")
    for name, row in rows.items():
        print(f"{name:<24} {row[f'median_{unit}']:>12.2f} "
              f"{row[f'ratio_vs_{baseline}']:>{ratio_width}.3f} "
              f"{_interval(row[f'paired_ratio_vs_{baseline}']):>28} "
              f"{row.get('items_per_s', float('nan')):>10.1f}")
    for name, ratio in paired.items():
        print(f"{name} per round: {_interval(ratio)}")
    return rows


def _ratio(a, b):
    """``a / b``; counts (page faults) may be 0: ``0 / 0 = 1``, ``a / 0 = inf``."""
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def _interval(ratio):
    median, low, high = ratio
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


_HLO_COPY = re.compile(r"= [a-z]+\d*\[([\d,]*)\]\S* copy\(")


def hlo_copies(hlo_text):
    """``(number of copy instructions, elements they copy)`` in an HLO module's text."""
    shapes = _HLO_COPY.findall(hlo_text)
    return len(shapes), sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)
