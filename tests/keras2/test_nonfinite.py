"""tf_keras: a mask update refuses NaN/inf weights with NonFiniteError and changes nothing,
in fit (with and without XLA) and in a custom loop; the report never calls it compressed."""
import math

import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from divergence import assert_divergence_is_refused
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.wrapper import optimizer_slots

L = keras.layers
DATA = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")


def _pruned(begin_step=1, jit_compile=False):
    model = tf_stdprune.prune_low_std(
        keras.Sequential([L.Dense(6, input_shape=(4,), name="a"), L.Dense(2, name="b")]),
        tf_stdprune.StdPruningSchedule([0.5, 1.0], 3, begin_step=begin_step))
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", jit_compile=jit_compile)
    return model


def _state(model, slots=True):
    """Masks, thresholds, sigmas and optimizer slots of the layer with the planted NaN
    (each layer prunes in its own training call: a finite layer prunes as usual)."""
    arrays = []
    for wrapper in model.layers[1:]:
        for (weight, mask, threshold), sigma in zip(wrapper.pruning_vars, wrapper.sigmas):
            arrays += [mask.numpy(), threshold.numpy(), sigma.numpy()]
            if slots:  # a training step's own optimizer update moves them; a mask update must not
                arrays += [s.numpy() for s in optimizer_slots(model.optimizer, weight)]
    return arrays


def _plant_nan(model):
    kernel = model.layers[1].pruning_vars[0][0]
    value = kernel.numpy()
    value[0, 1] = np.nan
    kernel.assign(value)


def _unchanged(before, after):
    return len(before) == len(after) and all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_update_pruning_step_raises_naming_layer_tensor_and_step(jit_compile):
    model = _pruned(begin_step=3, jit_compile=jit_compile)
    model.fit(*DATA, batch_size=4, epochs=1, verbose=0, callbacks=[tf_stdprune.UpdatePruningStep()])
    _plant_nan(model)
    before = _state(model, slots=False)
    with pytest.raises(tf_stdprune.NonFiniteError, match=r"prune_low_std_b.*kernel.*step 3"):
        model.fit(*DATA, batch_size=4, epochs=1, verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
    assert _unchanged(before, _state(model, slots=False))
    assert int(model.layers[1].pruned_at_step.numpy()) == -1  # the update never ran


def test_the_divergence_recipe_is_refused_instead_of_pruning_everything():
    """SGD at lr 1e6 on inputs x100 and targets 1e3 diverges; the next pruning raises."""
    assert_divergence_is_refused(_pruned(begin_step=4), keras.optimizers.SGD, step=4)


def test_a_custom_loop_raises_at_the_batch_end_of_the_pruning_step():
    model = _pruned()
    optimizer = model.optimizer
    callback = tf_stdprune.UpdatePruningStep()
    callback.set_model(model)
    callback.on_train_begin()
    _plant_nan(model)
    before = _state(model, slots=False)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))

    train_step(*DATA)
    with pytest.raises(tf_stdprune.NonFiniteError, match="step 1"):
        callback.on_train_batch_end(0)
    assert _unchanged(before, _state(model, slots=False))
    assert np.all(model.layers[1].pruning_vars[0][1].numpy() == 1.0)


def test_an_eager_update_masks_raises_and_changes_nothing():
    model = _pruned()
    _plant_nan(model)
    before = _state(model)
    kernel = model.layers[1].pruning_vars[0][0].numpy()
    with pytest.raises(tf_stdprune.NonFiniteError, match=r"prune_low_std_b.*kernel"):
        model.layers[1].pruning_obj.update_masks(1.0)
    assert _unchanged(before, _state(model))
    assert np.array_equal(model.layers[1].pruning_vars[0][0].numpy(), kernel, equal_nan=True)


def test_sparsity_report_of_non_finite_weights_gives_no_compression_rate():
    model = _pruned()
    kernel = model.layers[1].pruning_vars[0][0]
    value = np.zeros(kernel.shape, "float32")
    value[0, 0], value[1, 1] = np.nan, -np.inf
    kernel.assign(value)
    report = tf_stdprune.sparsity_report(model)
    assert report.non_finite_parameters == 2 and math.isnan(report.compression_rate)
    assert report.to_dict()["compression_rate"] is None
    assert report.zero_weights == value.size - 2
