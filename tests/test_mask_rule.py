"""The q*sigma rule against an independent numpy float64 re-implementation, exactly.

Masks are compared bit for bit. float32 (TF) and float64 (numpy) sigmas differ in the
last bits, so the test data keep every ``|w|`` at least ``MARGIN`` (relative) away from
the reference threshold (`_separate`); the comparison itself has no tolerance.
"""
import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune import mask_rule
from tf_stdprune.keras2.engine import keras

MARGIN = 1e-4
QUALITIES = (0.3, 0.7, 1.0, 1.4)
SHAPES = [(30,), (5, 6), (3, 3, 4), (3, 3, 3, 5), (2, 2, 2, 3, 2)]  # kernels used below


def reference_sigma(weights, mask, std_mode, initial_sigma):
    """Population std (float64) of the finite entries the mode looks at."""
    weights = np.asarray(weights, np.float64)
    if std_mode == "initial" and initial_sigma is not None:
        return initial_sigma
    keep = np.isfinite(weights) & (mask.astype(bool) if std_mode == "surviving" else True)
    return float(weights[keep].std()) if keep.any() else 0.0


def reference_mask(weights, mask, threshold):
    """``m_new = m AND |w| >= threshold`` (NaN compares false)."""
    with np.errstate(invalid="ignore"):
        return mask.astype(bool) & (np.abs(np.asarray(weights, np.float64)) >= threshold)


def _separate(weights, mask, q, std_mode, initial_sigma):
    """Moves the few ``|w|`` within MARGIN of ``q * sigma`` to 3 * MARGIN above it."""
    for _ in range(5):
        threshold = q * reference_sigma(weights, mask, std_mode, initial_sigma)
        close = (np.abs(np.abs(weights) - threshold) <= MARGIN * threshold) & (threshold > 0)
        if not close.any():
            return weights
        weights = np.where(close, np.sign(weights) * threshold * (1 + 3 * MARGIN), weights)
        weights = weights.astype(np.float32)
    raise AssertionError("could not separate the test data from the threshold")


def _random(rng, shape):
    scale = 10.0 ** rng.uniform(-3, 1)
    return (rng.standard_t(4, size=shape) * scale).astype(np.float32)


@pytest.mark.parametrize("std_mode", mask_rule.STD_MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_std_prune_matches_reference_over_iterations(std_mode, shape):
    rng = np.random.default_rng(len(shape) * 7 + int(np.prod(shape)))
    weights = _random(rng, shape)
    mask = (rng.random(shape) < 0.8).astype(np.float32)  # an existing partial mask
    stored, initial_sigma = tf.constant(mask_rule.UNSET_SIGMA), None
    for q in QUALITIES:
        weights = _separate(weights, mask, q, std_mode, initial_sigma)
        sigma_ref = reference_sigma(weights, mask, std_mode, initial_sigma)
        new_mask, threshold, sigma, new_weights = (t.numpy() for t in mask_rule.std_prune(
            tf.constant(weights), tf.constant(mask), np.float32(q), std_mode, stored))
        expected = reference_mask(weights, mask, q * sigma_ref)
        np.testing.assert_array_equal(new_mask, expected.astype(np.float32))
        assert new_mask.dtype == np.float32 and np.all(new_mask <= mask)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5)
        assert threshold == np.float32(q) * sigma
        np.testing.assert_array_equal(new_weights, np.where(expected, weights, 0.0))
        if std_mode == "surviving" or initial_sigma is None:
            assert mask_rule.masked_std(
                weights, mask if std_mode == "surviving" else np.ones_like(mask)
            ).numpy() == pytest.approx(sigma_ref, rel=1e-5)
        initial_sigma = sigma_ref if initial_sigma is None else initial_sigma
        stored = tf.constant(sigma)
        # "training": survivors move, pruned entries keep whatever value they had
        weights = (weights + rng.normal(0, 0.3 * sigma_ref + 1e-6, shape) * new_mask).astype(
            np.float32)
        mask = new_mask


def _wrapped_layers(std_mode):
    """Every prunable kind, built; kernels 1-D (BN gamma) to 5-D (Conv3D).

    Kernel shapes repeat those of SHAPES so that the XLA-compiled rule is reused.
    """
    layers = keras.layers
    specs = [
        (layers.Dense(6), (None, 5)),
        (layers.Conv1D(4, 3), (None, 9, 3)),
        (layers.Conv2D(5, 3), (None, 8, 8, 3)),
        (layers.Conv3D(2, 2), (None, 4, 4, 4, 3)),
        (layers.DepthwiseConv2D(3, depth_multiplier=5), (None, 8, 8, 3)),
        (layers.SeparableConv2D(6, 3, depth_multiplier=5), (None, 8, 8, 3)),
        (layers.Conv2DTranspose(3, 3), (None, 6, 6, 5)),
        (layers.BatchNormalization(), (None, 30)),
    ]
    wrapped = []
    for i, (layer, shape) in enumerate(specs):
        wrapper = tf_stdprune.PruneLowStd(
            layer, tf_stdprune.StdPruningSchedule([1.0], 1), std_mode=std_mode,
            layer_quality=1.0 + 0.25 * (i % 3))
        wrapper.build(shape)
        wrapped.append(wrapper)
    return wrapped


@pytest.mark.parametrize("std_mode", mask_rule.STD_MODES)
def test_wrapper_masks_match_reference(std_mode):
    rng = np.random.default_rng(3)
    wrappers = _wrapped_layers(std_mode)
    state = {}  # id(weight) -> (weights, mask, initial sigma) of the reference
    for wrapper in wrappers:
        for weight, mask, _ in wrapper.pruning_vars:
            start_mask = (rng.random(weight.shape) < 0.85).astype(np.float32)
            start = _random(rng, weight.shape) * start_mask  # stored pruned weights are 0
            weight.assign(start)
            mask.assign(start_mask)
            state[id(weight)] = (start, start_mask, None)
    assert len(state) == 9  # SeparableConv2D has two kernels
    for q in QUALITIES:
        for wrapper in wrappers:
            q_layer = np.float32(q) * np.float32(wrapper.layer_quality)
            for weight, _, _ in wrapper.pruning_vars:
                w, m, s0 = state[id(weight)]
                w = _separate(w, m, float(q_layer), std_mode, s0)
                weight.assign(w)
                state[id(weight)] = (w, m, s0)
            wrapper.pruning_obj.update_masks(q)
            for (weight, mask, threshold), sigma in zip(wrapper.pruning_vars, wrapper.sigmas):
                w, m, s0 = state[id(weight)]
                sigma_ref = reference_sigma(w, m, std_mode, s0)
                expected = reference_mask(w, m, float(q_layer) * sigma_ref)
                np.testing.assert_array_equal(mask.numpy(), expected.astype(np.float32),
                                              err_msg=f"{weight.name} q={q}")
                np.testing.assert_allclose(sigma.numpy(), sigma_ref, rtol=1e-5)
                assert threshold.numpy() == q_layer * sigma.numpy()  # multiplier exact
                np.testing.assert_array_equal(weight.numpy(), np.where(expected, w, 0.0))
                # "training" between pruning steps moves the survivors only
                w = (w + rng.normal(0, 0.3 * sigma_ref, w.shape) * expected).astype(np.float32)
                weight.assign(w)
                state[id(weight)] = (w, expected.astype(np.float32),
                                     sigma_ref if s0 is None else s0)


@pytest.mark.parametrize("std_mode", mask_rule.STD_MODES)
@pytest.mark.parametrize("value", [0.0, 0.25, -3.0, 1e-30, 3e38])
def test_constant_and_zero_tensors_prune_nothing(std_mode, value):
    mask = np.ones((5, 6), np.float32)
    mask[0, :3] = 0.0
    weights = np.full(mask.shape, value, np.float32)
    for q in (0.0, 1.0, 1e6):
        new_mask, threshold, sigma, new_weights = (t.numpy() for t in mask_rule.std_prune(
            weights, mask, np.float32(q), std_mode, tf.constant(mask_rule.UNSET_SIGMA)))
        assert sigma == 0.0 and threshold == 0.0
        np.testing.assert_array_equal(new_mask, mask)
        np.testing.assert_array_equal(new_weights, weights * mask)


def test_wrapper_on_zero_and_constant_kernels():
    for kernel in (np.zeros((5, 6), np.float32), np.full((5, 6), 0.5, np.float32)):
        for std_mode in mask_rule.STD_MODES:
            wrapper = tf_stdprune.PruneLowStd(keras.layers.Dense(6), std_mode=std_mode)
            wrapper.build((None, 5))
            wrapper.layer.kernel.assign(kernel)
            for q in (0.5, 2.0):
                wrapper.pruning_obj.update_masks(q)
            _, mask, threshold = wrapper.pruning_vars[0]
            assert np.all(mask.numpy() == 1.0) and threshold.numpy() == 0.0
            assert wrapper.sigmas[0].numpy() == 0.0
            np.testing.assert_array_equal(wrapper.layer.kernel.numpy(), kernel)


SPECIALS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("std_mode", mask_rule.STD_MODES)
@pytest.mark.parametrize("specials", [("nan",), ("inf",), ("nan", "inf", "-inf"), ("all nan",)])
def test_nan_and_inf_weights_never_give_nan(std_mode, specials):
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(5, 6)).astype(np.float32)
    if specials == ("all nan",):
        weights[:] = np.nan
    else:
        for name in specials:
            weights.flat[rng.choice(weights.size, 4, replace=False)] = SPECIALS[name]
    mask = (rng.random(weights.shape) < 0.9).astype(np.float32)
    stored, initial_sigma = tf.constant(mask_rule.UNSET_SIGMA), None
    for q in QUALITIES:
        weights = _separate(weights, mask, q, std_mode, initial_sigma)
        new_mask, threshold, sigma, new_weights = (t.numpy() for t in mask_rule.std_prune(
            weights, mask, np.float32(q), std_mode, stored))
        sigma_ref = reference_sigma(weights, mask, std_mode, initial_sigma)
        assert np.isfinite(sigma) and np.isfinite(threshold) and not np.isnan(new_mask).any()
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5)
        np.testing.assert_array_equal(new_mask, reference_mask(weights, mask, q * sigma_ref))
        assert np.all(new_mask <= mask) and not new_mask[np.isnan(weights)].any()
        assert np.all(new_weights[new_mask == 0] == 0.0)  # exactly 0, NaN/inf included
        initial_sigma = sigma_ref if initial_sigma is None else initial_sigma
        stored, mask = tf.constant(sigma), new_mask


def test_pruned_connection_never_returns():
    """Large weights at masked positions stay masked, whatever q and mode."""
    weights = np.linspace(-1.0, 1.0, 30, dtype=np.float32)
    mask = np.ones(30, np.float32)
    mask[[0, 1, -1]] = 0.0  # the largest |w|
    for std_mode in mask_rule.STD_MODES:
        new_mask = mask_rule.std_prune(weights, mask, np.float32(0.0), std_mode,
                                       tf.constant(mask_rule.UNSET_SIGMA))[0].numpy()
        np.testing.assert_array_equal(new_mask, mask)


def test_initial_mode_reuses_stored_sigma():
    weights = tf.constant([1.0, -2.0, 3.0, -4.0])
    ones = tf.ones([4])
    assert mask_rule.layer_sigma(weights, ones, "initial", tf.constant(0.5)).numpy() == 0.5
    first = mask_rule.layer_sigma(weights, ones, "initial", tf.constant(mask_rule.UNSET_SIGMA))
    assert first.numpy() == pytest.approx(np.std([1.0, -2.0, 3.0, -4.0]), rel=1e-6)
    with pytest.raises(ValueError, match="std_mode"):
        mask_rule.layer_sigma(weights, ones, "median", tf.constant(-1.0))
