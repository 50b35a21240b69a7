"""Shared measurement helpers: interleaved contenders, medians, paired ratios (from
`tf_stdprune.timing`), JSON + table."""
import json
import math
import re
import resource
import statistics

from tf_stdprune.timing import interleaved_samples, paired_ratio, ratio  # noqa: F401  (this module's names)


def minor_page_faults():
    """Minor page faults of this process so far: a ``clock`` for `interleaved_samples`
    that counts the pages of fresh memory the kernel mapped in (4 KiB each on x86-64), not
    time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
                      f"ratio_vs_{baseline}": ratio(t, medians[baseline]),
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
    for name, value in paired.items():
        print(f"{name} per round: {_interval(value)}")
    return rows


def _interval(ratio):
    median, low, high = ratio
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


_HLO_COPY = re.compile(r"= [a-z]+\d*\[([\d,]*)\]\S* copy\(")


def hlo_copies(hlo_text):
    """``(number of copy instructions, elements they copy)`` in an HLO module's text."""
    shapes = _HLO_COPY.findall(hlo_text)
    return len(shapes), sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)
