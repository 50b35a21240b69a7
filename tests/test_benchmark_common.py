"""The benchmarks' helpers: paired ratio (per-round ratios, median, sign-test interval),
interleaving, and the page-fault clock."""
import mmap
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from common import hlo_copies, interleaved_samples, minor_page_faults, paired_ratio, \
    report  # noqa: E402


def _binomial_tail(n, k):
    """P(Binomial(n, 1/2) < k), by counting outcomes."""
    outcomes = np.array([bin(i).count("1") for i in range(2 ** n)])
    return np.mean(outcomes < k)


@pytest.mark.parametrize("n", [1, 5, 6, 9, 12, 15])
def test_interval_is_the_widest_sign_test_interval_at_95_percent(n):
    rng = np.random.default_rng(n)
    numerator, denominator = rng.uniform(1, 2, n), rng.uniform(1, 2, n)
    ratios = np.sort(numerator / denominator)
    k = max([k for k in range(1, n + 1) if 2 * _binomial_tail(n, k) <= 0.05], default=1)
    median, low, high = paired_ratio(list(numerator), list(denominator))
    assert median == pytest.approx(np.median(ratios))
    assert (low, high) == (ratios[k - 1], ratios[n - k])
    assert low <= median <= high


def test_ratio_is_taken_within_each_round():
    # Drift scales both contenders of a round alike: per-round ratios cancel it.
    drift = np.array([1.0, 3.0, 0.5, 2.0, 1.5, 4.0, 0.8])
    median, low, high = paired_ratio(list(0.9 * drift), list(drift))
    assert median == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(0.9)


def test_contenders_take_turns_first():
    order = []
    contenders = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved_samples(contenders, rounds=3, warmup=0)
    assert order == list("abcbcacab")
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_rounds_with_zero_counts_give_ratio_one_or_inf():
    assert paired_ratio([0, 0, 3], [0, 0, 0]) == (1.0, 1.0, float("inf"))


def test_page_fault_clock_counts_each_fresh_page_and_no_reused_one():
    pages = 4096
    size = pages * mmap.PAGESIZE

    def touch_fresh_memory():
        with mmap.mmap(-1, size) as memory:
            memory.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per small page
            for offset in range(0, size, mmap.PAGESIZE):
                memory[offset] = 1

    reused = bytearray(size)

    def touch_reused_memory():
        for offset in range(0, size, mmap.PAGESIZE):
            reused[offset] = 1

    samples = interleaved_samples({"fresh": touch_fresh_memory, "reused": touch_reused_memory},
                                  rounds=3, clock=minor_page_faults)
    assert min(samples["fresh"]) >= pages
    assert max(samples["reused"]) < pages / 10


def test_hlo_copies_counts_copy_instructions_and_their_elements():
    hlo = """
  %copy.1 = f32[3,3,16,32]{3,2,1,0} copy(%get-tuple-element.7)
  %copy.2 = pred[] copy(%p.1)
  %copy.3 = bf16[10]{0} copy(%fusion.2), metadata={op_type="Mul"}
  %fusion.4 = f32[3,3,16,32]{3,2,1,0} fusion(%copy.1), kind=kLoop
  %add.5 = s64[] add(%copy.2, %c)
"""
    assert hlo_copies(hlo) == (3, 3 * 3 * 16 * 32 + 1 + 10)
    assert hlo_copies("") == (0, 0)


def test_report_prints_json_and_table_with_ratios_to_the_baseline_and_the_pairs(capsys):
    """Per contender the median, the ratio of medians and the per-round ratio to the
    baseline; each pair's per-round ratio printed after the table."""
    samples = {"dense": [1.0, 2.0, 4.0], "pruned": [2.0, 4.0, 6.0]}
    rows = report("step", {"batch": 1}, samples, "dense", items=8, pairs=[("pruned", "dense")])
    assert rows["pruned"]["ratio_vs_dense"] == pytest.approx(2.0)
    assert rows["pruned"]["paired_ratio_vs_dense"][0] == pytest.approx(2.0)
    assert rows["dense"]["items_per_s"] == pytest.approx(4.0)
    out = capsys.readouterr().out
    assert '"benchmark": "step"' in out and "pruned / dense per round: 2.000" in out
