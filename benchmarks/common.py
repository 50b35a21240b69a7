"""Shared measurement helpers: interleaved contenders, medians, JSON + table output."""
import json
import statistics
import time


def interleaved_medians(contenders, rounds, warmup=1, clock=time.perf_counter):
    """Median seconds per call of each contender, run in turn (a, b, c, a, b, c, ...).

    Interleaving spreads the machine's noise (about 5 % here) evenly over the
    contenders, so their ratios are fair even when absolute times drift. With
    ``clock=time.process_time`` the CPU seconds of this process (all its threads) are
    measured instead of wall time: steadier when other processes share the machine.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def report(title, config, medians, baseline, unit_scale=1000.0, unit="ms", items=None):
    """Prints the results as one JSON object, then as a table with ratios to ``baseline``.

    With ``items`` (e.g. images per call) each row also gets ``items_per_s``.
    """
    rows = {name: {f"median_{unit}": t * unit_scale, f"ratio_vs_{baseline}": t / medians[baseline]}
            for name, t in medians.items()}
    if items:
        for name, t in medians.items():
            rows[name]["items_per_s"] = items / t
    print(json.dumps({"benchmark": title, "config": config, "results": rows}, indent=2))
    print(f"\n{title}  ({', '.join(f'{k}={v}' for k, v in config.items())})")
    print(f"{'contender':<24} {'median ' + unit:>12} {'x ' + baseline:>14} {'items/s':>10}")
    for name, row in rows.items():
        print(f"{name:<24} {row[f'median_{unit}']:>12.2f} {row[f'ratio_vs_{baseline}']:>14.3f} "
              f"{row.get('items_per_s', float('nan')):>10.1f}")
    return rows
