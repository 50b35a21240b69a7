"""`accuracy_change`: the paired top-1 change and its exact McNemar interval."""
import math

import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.accuracy import binomial_cdf, clopper_pearson


def _pairs(both, dense_only, pruned_only, neither):
    """Predictions and labels (class 1) with the given counts of each outcome."""
    dense = [1] * both + [1] * dense_only + [0] * pruned_only + [0] * neither
    pruned = [1] * both + [0] * dense_only + [1] * pruned_only + [0] * neither
    return np.array(dense), np.array(pruned), np.ones(len(dense), int)


def test_a_hand_computed_case_with_no_pruned_wins():
    """b = 4, c = 0 of 20 images: change -20 points; Clopper-Pearson of 0 of 4 is
    [0, 1 - 0.025 ** (1/4)], mapped to 100 * 4/20 * (2p - 1); McNemar p = 2 / 2**4."""
    change = tf_stdprune.accuracy_change(*_pairs(10, 4, 0, 6))
    p_high = 1 - 0.025 ** 0.25
    assert (change.dense_only, change.pruned_only, change.images) == (4, 0, 20)
    assert change.change == pytest.approx(-20.0)
    assert change.low == pytest.approx(-20.0)
    assert change.high == pytest.approx(20 * (2 * p_high - 1), abs=1e-9)
    assert change.p_value == pytest.approx(0.125)
    assert change.low <= change.change < 0 < change.high  # p = 0.125: 0 is inside


def test_a_hand_computed_case_with_one_pruned_win():
    """b = 3, c = 1 of 50: P(X <= 1 | 4, 1/2) = 5/16, so p = 10/16; p_low solves
    1 - (1 - p)**4 = 0.025."""
    change = tf_stdprune.accuracy_change(*_pairs(40, 3, 1, 6))
    assert change.change == pytest.approx(-4.0)
    assert change.p_value == pytest.approx(10 / 16)
    p_low = 1 - 0.975 ** 0.25
    assert change.low == pytest.approx(8 * (2 * p_low - 1), abs=1e-9)
    # p_high solves (1 - p)**4 + 4 p (1 - p)**3 = 0.025.
    _, p_high = clopper_pearson(1, 4)
    assert (1 - p_high) ** 4 + 4 * p_high * (1 - p_high) ** 3 == pytest.approx(0.025, abs=1e-12)
    assert change.high == pytest.approx(8 * (2 * p_high - 1), abs=1e-9)


def test_models_that_agree_everywhere_change_nothing():
    change = tf_stdprune.accuracy_change(*_pairs(7, 0, 0, 3))
    assert (change.change, change.low, change.high, change.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_scores_count_by_their_argmax():
    labels = np.array([0, 1, 2])
    dense = np.eye(3)[[0, 1, 0]]
    pruned = np.eye(3)[[0, 2, 2]]
    change = tf_stdprune.accuracy_change(dense, pruned, labels)
    assert (change.dense_only, change.pruned_only) == (1, 1)


def _brute_force_cdf(k, m, p):
    return sum(math.comb(m, j) * p ** j * (1 - p) ** (m - j) for j in range(k + 1))


@pytest.mark.parametrize("c, m", [(0, 1), (3, 10), (17, 40), (40, 40), (120, 300)])
def test_the_interval_and_p_value_match_an_independent_reference(c, m):
    """Against scipy's exact binomial test where scipy is installed, else a brute-force
    binomial sum: the interval's ends hold exactly alpha / 2 in the tail."""
    rng = np.random.default_rng(c + m)
    outcomes = [(1, 0)] * (m - c) + [(0, 1)] * c + [(1, 1)] * 25 + [(0, 0)] * 5
    outcomes = [outcomes[i] for i in rng.permutation(len(outcomes))]
    dense, pruned = (np.array(column) for column in zip(*outcomes))
    n = len(outcomes)
    change = tf_stdprune.accuracy_change(dense, pruned, np.ones(n, int))
    try:
        from scipy import stats
        test = stats.binomtest(c, m, 0.5)
        interval = test.proportion_ci(0.95, method="exact")
        p_low, p_high, p_value = interval.low, interval.high, test.pvalue
        assert binomial_cdf(c, m, 0.3) == pytest.approx(stats.binom.cdf(c, m, 0.3), rel=1e-9)
    except ImportError:
        p_low, p_high = clopper_pearson(c, m)
        if c:
            assert 1 - _brute_force_cdf(c - 1, m, p_low) == pytest.approx(0.025, abs=1e-9)
        if c < m:
            assert _brute_force_cdf(c, m, p_high) == pytest.approx(0.025, abs=1e-9)
        p_value = min(1, 2 * min(_brute_force_cdf(c, m, 0.5), 1 - _brute_force_cdf(c - 1, m, 0.5)))
    scale = 100 * m / n
    assert change.change == pytest.approx(100 * (2 * c - m) / n)
    assert change.low == pytest.approx(scale * (2 * p_low - 1), abs=1e-7)
    assert change.high == pytest.approx(scale * (2 * p_high - 1), abs=1e-7)
    assert change.p_value == pytest.approx(p_value, rel=1e-7)
    assert (change.low <= 0 <= change.high) == (change.p_value > 0.05)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="pruned_predictions: expected 3 class indices"):
        tf_stdprune.accuracy_change([0, 1, 2], [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="labels: no images"):
        tf_stdprune.accuracy_change([], [], [])
    with pytest.raises(ValueError, match="confidence=1.5"):
        tf_stdprune.accuracy_change([0], [0], [0], confidence=1.5)
