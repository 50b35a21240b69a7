"""Dropout ratio adjustment (Han et al. 2015, section 3.3): formula, graph walk, training."""
import math

import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.callbacks import DropoutRescaling
from tf_stdprune.keras2.engine import keras
from tf_stdprune.procedure.dropout import (
    ORIGINAL_RATE, dropout_sources, rescale_dropout, rescaled_rate,
    restore_dropout)

BATCH, STEPS = 64, 4


class ZeroFraction(keras.layers.Layer):
    """Identity that stores the fraction of exact zeros of its input while training."""

    def build(self, input_shape):
        self.fraction = self.add_weight("fraction", shape=(), initializer="zeros",
                                        trainable=False)

    def call(self, inputs, training=None):
        if training:
            self.fraction.assign(tf.reduce_mean(tf.cast(tf.equal(inputs, 0.0), tf.float32)))
        return inputs


class RateRecorder(keras.callbacks.Callback):
    """Records, per epoch, each Dropout's rate and the zero fraction the probe saw."""

    def __init__(self):
        super().__init__()
        self.rates, self.fractions = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.rates.append({l.name: l.rate for l in self.model.layers
                           if isinstance(l, keras.layers.Dropout)})
        self.fractions.append(float(self.model.get_layer("probe").fraction.numpy()))


def mlp():
    """Input dropout (feeds fc1), then fc1 -> dropout -> probe -> relu -> fc2."""
    inputs = keras.Input((20,))
    x = keras.layers.Dropout(0.5, name="drop_in")(inputs)
    x = keras.layers.Dense(64, name="fc1")(x)
    x = keras.layers.Dropout(0.4, name="drop_fc1")(x)
    x = ZeroFraction(name="probe")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc2")(x))


def test_rescaled_rate_is_d_o_times_sqrt_of_connection_ratio():
    assert rescaled_rate(0.5, 100, 25) == pytest.approx(0.25)
    assert rescaled_rate(0.5, 100, 100) == 0.5
    assert rescaled_rate(0.3, 1000, 0) == 0.0
    with pytest.raises(ValueError, match="remaining_connections.*101"):
        rescaled_rate(0.5, 100, 101)
    with pytest.raises(ValueError, match="original_rate.*1.5"):
        rescaled_rate(1.5, 100, 10)


def test_each_dropout_finds_the_layer_it_follows_or_else_feeds():
    model = tf_stdprune.prune_low_std(mlp())
    sources = {d.name: s.layer.name for d, s in dropout_sources(model)}
    assert sources == {"drop_in": "fc1", "drop_fc1": "fc1"}
    sequential = keras.Sequential([keras.layers.Dense(4, input_shape=(3,), name="a"),
                                   keras.layers.Dropout(0.2, name="d"),
                                   keras.layers.Dense(2, name="b")])
    assert [(d.name, s.name) for d, s in dropout_sources(sequential)] == [("d", "a")]


def test_rate_after_pruning_equals_formula_and_is_restored_twice_safely():
    model = tf_stdprune.prune_low_std(mlp())
    for layer in model.layers:
        if isinstance(layer, tf_stdprune.PruneLowStd):
            layer.pruning_obj.update_masks(1.0)
    kernel = model.get_layer("prune_low_std_fc1").layer.kernel.numpy()
    mask = [m for w, m, _ in model.get_layer("prune_low_std_fc1").pruning_vars][0].numpy()
    remaining = int(np.count_nonzero(kernel * mask))
    assert 0 < remaining < 20 * 64
    changed = rescale_dropout(model)
    assert changed["drop_fc1"] == pytest.approx(0.4 * math.sqrt(remaining / 1280))
    assert model.get_layer("drop_in").rate == pytest.approx(0.5 * math.sqrt(remaining / 1280))
    assert getattr(model.get_layer("drop_fc1"), ORIGINAL_RATE) == 0.4
    assert rescale_dropout(model) == {}  # nothing pruned since: nothing changes
    assert restore_dropout(model) == {"drop_in": 0.5, "drop_fc1": 0.4}
    assert restore_dropout(model) == {}
    assert model.get_layer("drop_fc1").rate == 0.4
    assert tf_stdprune.strip_pruning(model).get_layer("drop_fc1").rate == 0.4
    assert not hasattr(model.get_layer("drop_fc1"), ORIGINAL_RATE)
    # strip_pruning copies the current rate: restoring before stripping gives D_o back.
    rescale_dropout(model)
    restore_dropout(model)
    assert tf_stdprune.strip_pruning(model).get_layer("drop_in").rate == 0.5


def _train(rescale):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(BATCH * STEPS, 20)).astype("float32")
    y = rng.integers(0, 3, size=len(x))
    model = tf_stdprune.prune_low_std(mlp(), pruning_schedule=tf_stdprune.StdPruningSchedule(
        [1.2], steps_per_iteration=1000))
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    recorder = RateRecorder()
    callbacks = [tf_stdprune.UpdatePruningStep()] + ([DropoutRescaling()] if rescale else [])
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=callbacks + [recorder])
    return model, recorder


def test_training_uses_the_rescaled_rate_after_pruning_and_ends_with_the_original():
    # The schedule prunes in epoch 0's first batch; epoch 1 trains with the new rate.
    model, recorder = _train(rescale=True)
    wrapper = model.get_layer("prune_low_std_fc1")
    remaining = int(np.count_nonzero(wrapper.pruning_vars[0][1].numpy()))
    expected = 0.4 * math.sqrt(remaining / 1280)
    assert expected < 0.3
    assert recorder.rates[0]["drop_fc1"] == 0.4
    assert recorder.rates[1]["drop_fc1"] == pytest.approx(expected)
    # The probe counts the zeros drop_fc1 wrote in the last training batch (64 x 64).
    assert recorder.fractions[0] == pytest.approx(0.4, abs=0.03)
    assert recorder.fractions[1] == pytest.approx(expected, abs=0.03)
    _, plain = _train(rescale=False)
    assert plain.rates[1]["drop_fc1"] == 0.4
    assert plain.fractions[1] == pytest.approx(0.4, abs=0.03)
    assert model.get_layer("drop_fc1").rate == 0.4
    assert tf_stdprune.strip_pruning(model).get_layer("drop_fc1").rate == 0.4


def test_iterative_callbacks_rescale_by_default_and_can_be_switched_off(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 20)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    model = tf_stdprune.prune_low_std(mlp(), pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.8], steps_per_iteration=1))
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    recorder = RateRecorder()
    callbacks = tf_stdprune.iterative_callbacks(str(tmp_path), 1, 0.01, lr_drops=(),
                                                figures=False)
    assert type(callbacks[-1]).__name__ == "DropoutRescaling"
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks + [recorder])
    remaining = int(np.count_nonzero(model.get_layer("prune_low_std_fc1").pruning_vars[0][1]))
    assert recorder.rates[0]["drop_fc1"] == pytest.approx(0.4 * math.sqrt(remaining / 1280))
    assert remaining < 1280 and model.get_layer("drop_fc1").rate == 0.4
    off = tf_stdprune.iterative_callbacks(str(tmp_path), 1, 0.1, rescale_dropout=False)
    assert "DropoutRescaling" not in [type(c).__name__ for c in off]


def test_keras3_model_gets_the_same_rescaling_and_restoration():
    import keras as keras3
    inputs = keras3.Input((6,))
    x = keras3.layers.Dense(8, name="a")(keras3.layers.Dropout(0.2, name="din")(inputs))
    x = keras3.layers.Dropout(0.5, name="d")(keras3.layers.ReLU()(x))
    model = tf_stdprune.prune_low_std(keras3.Model(inputs, keras3.layers.Dense(3, name="b")(x)))
    for layer in model.layers:
        if hasattr(layer, "update_masks"):
            layer.update_masks(0.8)
    kernel = model.get_layer("prune_low_std_a").layer.kernel.numpy()
    remaining = int(np.count_nonzero(kernel))
    assert 0 < remaining < 48
    assert rescale_dropout(model) == pytest.approx(
        {"din": 0.2 * math.sqrt(remaining / 48), "d": 0.5 * math.sqrt(remaining / 48)})
    assert restore_dropout(model) == {"din": 0.2, "d": 0.5}
    assert restore_dropout(model) == {}
