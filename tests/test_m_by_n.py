"""N:M sparsity combined with the std rule, as a pure function, against a numpy oracle."""
import numpy as np
import pytest
import tensorflow as tf
from reference import reference_m_by_n_mask, reference_m_by_n_step

import tf_stdprune
from tf_stdprune import mask_rule

SHAPES = [(8, 3), (6, 5), (3, 3, 8, 2), (1, 1, 10, 4), (2, 2, 3, 3)]  # partial groups too


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m_by_n", [(2, 4), (1, 4), (3, 8)])
def test_m_by_n_mask_matches_a_sorting_oracle_with_pruned_entries(shape, m_by_n):
    """Each group keeps its n - m largest kept magnitudes, as the sorting oracle says."""
    rng = np.random.default_rng(sum(shape) + m_by_n[1])
    weights = rng.normal(size=shape).astype(np.float32)
    weights.flat[::7] = weights.flat[3]  # ties between groups and within them
    mask = (rng.random(shape) > 0.2).astype(np.float32)
    got = mask_rule.m_by_n_mask(tf.constant(weights), tf.constant(mask), m_by_n).numpy()
    np.testing.assert_array_equal(got.astype(bool), reference_m_by_n_mask(weights, mask, *m_by_n))


@pytest.mark.parametrize("std_mode", mask_rule.STD_MODES)
@pytest.mark.parametrize("shape", [(12, 6), (3, 3, 8, 4)])
def test_std_prune_with_m_by_n_is_n_m_first_then_q_sigma_on_what_is_left(std_mode, shape):
    """Over three steps the compiled rule's masks and sigmas equal the oracle's."""
    rng = np.random.default_rng(3)
    weights = rng.normal(size=shape).astype(np.float32)
    mask, ref_mask, stored, initial = np.ones(shape, np.float32), np.ones(shape, bool), -1.0, None
    for q in (0.3, 0.8, 1.2):
        new_mask, threshold, sigma, masked = mask_rule.std_prune(
            tf.constant(weights), tf.constant(mask), q, std_mode, tf.constant(stored), (2, 4))
        ref_mask, ref_sigma = reference_m_by_n_step(weights, ref_mask, q, std_mode, 2, 4, initial)
        np.testing.assert_array_equal(new_mask.numpy().astype(bool), ref_mask)
        np.testing.assert_allclose(float(sigma), ref_sigma, rtol=1e-5)
        np.testing.assert_array_equal(masked.numpy(), np.where(ref_mask, weights, 0.0))
        assert tf_stdprune.check_m_by_n_sparsity(masked.numpy(), 2, 4)
        mask, stored = new_mask.numpy(), float(sigma)
        initial = initial if initial is not None else ref_sigma


def test_the_keras3_ops_table_gives_the_same_mask_as_tensorflow():
    """The rule written once gives the same N:M mask through keras.ops as through tf."""
    import keras

    weights = np.random.default_rng(1).normal(size=(3, 3, 6, 5)).astype(np.float32)
    mask = np.ones_like(weights)
    through_keras = mask_rule.m_by_n_mask(keras.ops.convert_to_tensor(weights),
                                          keras.ops.convert_to_tensor(mask), (2, 4),
                                          mask_rule.keras3_ops())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(through_keras),
                                  mask_rule.m_by_n_mask(weights, mask, (2, 4)).numpy())


def test_check_m_by_n_sparsity_counts_zeros_per_group_along_the_input_axis():
    """A kernel passes iff every group along the input axis has m zeros, partial ones too."""
    kernel = np.zeros((6, 2), np.float32)
    kernel[[0, 1, 4, 5], 0] = 1.0  # column 0: groups [0:4] two nonzeros, [4:6] two
    assert tf_stdprune.check_m_by_n_sparsity(kernel, 2, 4)
    kernel[2, 0] = 1.0  # three nonzeros in the first group
    assert not tf_stdprune.check_m_by_n_sparsity(kernel, 2, 4)
    assert not tf_stdprune.check_m_by_n_sparsity(np.ones((1, 1, 4, 1)), 2, 4)
    assert tf_stdprune.check_m_by_n_sparsity(np.ones((1, 1, 4, 1)) * [[[[1], [0], [1], [0]]]], 2, 4)


@pytest.mark.parametrize("bad", [(4, 4), (2,), (2.0, 4), (-1, 4), "2:4", (True, 4)])
def test_bad_m_by_n_values_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
        mask_rule.check_m_by_n(bad)


def test_m_by_n_refuses_tensors_without_an_input_dimension():
    with pytest.raises(ValueError, match="rank 2 or 4"):
        mask_rule.check_m_by_n_ranks("bn", [np.ones(4)], (2, 4))
    with pytest.raises(ValueError, match="rank"):
        tf_stdprune.check_m_by_n_sparsity(np.ones((2, 3, 4)), 2, 4)
