"""Keras 3: a mask update refuses NaN/inf weights with NonFiniteError and changes nothing;
`sparsity_report` never calls a diverged model compressed (run on every backend)."""
import math

import keras
import numpy as np
import pytest

import tf_stdprune
from divergence import assert_divergence_is_refused
from tf_stdprune.keras3.wrapper import optimizer_slots


def _pruned(begin_step=1):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="a"),
                              keras.layers.Dense(2, name="b")])
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.5, 1.0], steps_per_iteration=3, begin_step=begin_step))
    pruned.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    return pruned


def _state(model):
    """Every mask, threshold, sigma and optimizer slot of the wrappers, as numpy arrays."""
    arrays = []
    for wrapper in [l for l in model.layers if isinstance(l, tf_stdprune.keras3.wrapper.PruneLowStd)]:
        arrays += [keras.ops.convert_to_numpy(v) for v in wrapper.masks + wrapper.thresholds
                   + wrapper.sigmas]
        for weight in wrapper.pruned_weights:
            arrays += [keras.ops.convert_to_numpy(s) for s in optimizer_slots(model.optimizer, weight)]
    return arrays


def _plant_nan(model):
    kernel = model.layers[1].layer.kernel
    value = keras.ops.convert_to_numpy(kernel).copy()
    value[0, 1] = np.nan
    kernel.assign(value)


DATA = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")


def test_fit_with_update_pruning_step_raises_naming_layer_tensor_and_step_and_keeps_the_masks():
    model = _pruned(begin_step=3)
    model.fit(*DATA, batch_size=4, epochs=1, verbose=0, callbacks=[tf_stdprune.UpdatePruningStep()])
    _plant_nan(model)
    before = _state(model)
    with pytest.raises(tf_stdprune.NonFiniteError, match=r"prune_low_std_b.*kernel.*step 3"):
        model.fit(*DATA, batch_size=4, epochs=1, verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
    after = _state(model)
    assert len(after) == len(before) and all(np.array_equal(a, b, equal_nan=True)
                                             for a, b in zip(after, before))
    # the first layer is due at the same step and was not pruned either (checked first)
    assert np.all(keras.ops.convert_to_numpy(model.layers[0].masks[0]) == 1.0)


def test_the_divergence_recipe_stops_at_the_next_pruning_step():
    """SGD at lr 1e6 on inputs x100 and targets 1e3 diverges; the next pruning step raises."""
    assert_divergence_is_refused(_pruned(begin_step=4), keras.optimizers.SGD, step=4)


def test_a_custom_loop_calling_the_callback_hooks_raises_before_pruning():
    model = _pruned()
    callback = tf_stdprune.UpdatePruningStep()
    callback.set_model(model)
    _plant_nan(model)
    callback.on_train_begin()
    before = _state(model)
    with pytest.raises(tf_stdprune.NonFiniteError, match="step 1"):
        callback.on_train_batch_begin(0)
        model.train_on_batch(*DATA)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(_state(model), before))


def test_update_masks_with_a_nan_stored_sigma_raises_and_changes_nothing():
    model = _pruned()
    wrapper = model.layers[0]
    wrapper.sigmas[0].assign(float("inf"))
    kernel = keras.ops.convert_to_numpy(wrapper.layer.kernel)
    with pytest.raises(tf_stdprune.NonFiniteError, match="stored sigma"):
        wrapper.update_masks(1.0, step=5)
    assert np.array_equal(keras.ops.convert_to_numpy(wrapper.layer.kernel), kernel)
    assert np.all(keras.ops.convert_to_numpy(wrapper.masks[0]) == 1.0)


def test_sparsity_report_of_a_model_with_non_finite_weights_gives_no_compression_rate():
    model = _pruned()
    kernel = model.layers[1].layer.kernel
    value = np.zeros(kernel.shape, "float32")
    value[0, 0], value[1, 1] = np.nan, np.inf
    kernel.assign(value)  # mostly zeros: would read as highly compressed
    report = tf_stdprune.sparsity_report(model)
    assert report.non_finite_parameters == 2 and not report.finite
    assert math.isnan(report.compression_rate) and report.to_dict()["compression_rate"] is None
    assert "not finite: 2 parameters" in report.summary()
    assert report.zero_weights == value.size - 2  # NaN and inf are not zeros
    assert tf_stdprune.sparsity_report(_pruned()).finite
