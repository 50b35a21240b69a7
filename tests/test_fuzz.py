"""Property tests of the mask rule against the numpy reference (hypothesis).

Shapes from 1 element up, constant tensors, NaN/inf entries, huge and tiny q, every
std_mode: the mask never grows, is never NaN, and equals the reference except where
|w| lies within float32 rounding of the threshold.
"""
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import tensorflow as tf

from tf_stdprune import mask_rule

from reference import reference_step

FLOATS = st.one_of(
    st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e-30, -1e-30]),
)
WEIGHTS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9), elements=FLOATS)
QUALITIES = st.one_of(st.floats(0, 10, width=32, allow_subnormal=False), st.sampled_from([0.0, 1e-12, 1e6, 1e30]))


def _flushed(x):
    """``x``, or 0 where it is subnormal: XLA flushes subnormal results to zero."""
    return x if abs(x) >= np.finfo(np.float32).tiny else np.float32(0)


@settings(max_examples=80, deadline=None)
@given(weights=WEIGHTS, q=QUALITIES, std_mode=st.sampled_from(mask_rule.STD_MODES),
       keep_fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
@example(weights=np.array([1e-30, 0.0], np.float32), q=1e-12, std_mode="initial",
         keep_fraction=0.0, seed=0)  # q * sigma = 5e-43 is subnormal: threshold 0
def test_mask_rule_matches_reference(weights, q, std_mode, keep_fraction, seed):
    mask = (np.random.default_rng(seed).random(weights.shape) < keep_fraction).astype(np.float32)
    new_mask, threshold, sigma, new_weights = (t.numpy() for t in mask_rule.std_prune(
        tf.constant(weights), tf.constant(mask), np.float32(q), std_mode,
        tf.constant(mask_rule.UNSET_SIGMA)))
    expected, expected_sigma = reference_step(weights, mask.astype(bool), q, std_mode)

    assert np.isfinite(sigma) and sigma >= 0
    assert threshold == _flushed(np.float32(q) * sigma)
    assert np.all(new_weights[new_mask == 0] == 0.0)  # exactly 0, NaN/inf weights included
    np.testing.assert_array_equal(new_weights[new_mask == 1], weights[new_mask == 1])
    assert not np.isnan(new_mask).any()
    assert set(np.unique(new_mask)) <= {0.0, 1.0}
    assert np.all(new_mask <= mask)  # never grows
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4, atol=1e-30)
    near = np.isclose(np.abs(weights.astype(np.float64)), q * expected_sigma, rtol=1e-4)
    np.testing.assert_array_equal(new_mask.astype(bool)[~near], expected[~near])
    assert not new_mask[np.isnan(weights)].any()  # NaN weights are removed


@settings(max_examples=40, deadline=None)
@given(value=st.floats(-1e6, 1e6, width=32), size=st.integers(1, 500),
       std_mode=st.sampled_from(mask_rule.STD_MODES), q=QUALITIES)
def test_constant_tensor_prunes_nothing(value, size, std_mode, q):
    weights = tf.fill([size], np.float32(value))
    ones = tf.ones([size])
    sigma = mask_rule.layer_sigma(weights, ones, std_mode, tf.constant(mask_rule.UNSET_SIGMA))
    assert sigma.numpy() == 0.0
    np.testing.assert_array_equal(mask_rule.prune_mask(weights, ones, q * sigma).numpy(), 1.0)


def test_large_tensor_matches_reference():
    rng = np.random.default_rng(1)
    weights = rng.standard_t(3, size=(512, 4096)).astype(np.float32)
    mask = (rng.random(weights.shape) < 0.7).astype(np.float32)
    for std_mode in mask_rule.STD_MODES:
        new_mask, _, sigma, _ = (t.numpy() for t in mask_rule.std_prune(
            weights, mask, np.float32(1.3), std_mode, tf.constant(mask_rule.UNSET_SIGMA)))
        expected, expected_sigma = reference_step(weights, mask.astype(bool), 1.3, std_mode)
        np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5)
        mismatches = np.count_nonzero(new_mask.astype(bool) != expected)
        assert mismatches <= 2, mismatches  # only entries within float32 rounding of q*sigma
        assert 0.3 < 1 - new_mask.mean() < 0.95
