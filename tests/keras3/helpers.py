"""Keras 3 test helpers: the backend under test and a tiny model (no tf_keras here)."""
import keras
import numpy as np
import pytest

import tf_stdprune

BACKEND = keras.backend.backend()
# The subprocess checks that the Keras 3 path never imports tf_keras or tfmot run once, on
# the TensorFlow backend: which of our modules a call imports does not depend on it.
IMPORT_CHECK = pytest.mark.skipif(BACKEND != "tensorflow",
                                  reason="the import graph is checked on TensorFlow")


@keras.saving.register_keras_serializable(package="tests_keras3")
class TwoDense(keras.layers.Layer):
    """A custom layer made of two Dense sublayers."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.first = keras.layers.Dense(units, activation="relu", name="first")
        self.second = keras.layers.Dense(units, name="second")

    def call(self, x):
        return self.second(self.first(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def tiny_cnn(num_classes=3, l2=0.0):
    """Conv-BN-ReLU-pool, then Dense, as a Keras 3 Sequential model."""
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", kernel_regularizer=reg, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(num_classes, kernel_regularizer=reg, name="dense"),
    ])


BATCH = 16


def tiny_data(samples=64):
    """``(x, y)``: Gaussian images and labels in {0, 1, 2} (the parent conftest's data)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 8, 8, 3)).astype("float32")
    return x, rng.integers(0, 3, size=samples)


def pruned_for_iterations(qualities=(0.5, 1.0, 1.5), epochs=1, steps=4, dropout=True):
    """`tiny_cnn` (without its Dropout if ``dropout`` is false) pruned with one q per
    iteration of ``epochs`` epochs of ``steps`` steps, compiled with SGD + momentum."""
    model = tiny_cnn()
    if not dropout:
        model = keras.Sequential([keras.Input((8, 8, 3))] + [
            layer for layer in model.layers if not isinstance(layer, keras.layers.Dropout)])
    schedule = tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration=epochs * steps)
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    return pruned


def state_arrays(model):
    """Every value a run's checkpoint holds: model variables, then optimizer variables."""
    return [np.asarray(keras.ops.convert_to_numpy(v))
            for v in list(model.variables) + list(model.optimizer.variables)]


def train_step(model, optimizer, loss_fn, x, y):
    """One optimizer step written with the backend's own autodiff (TensorFlow's
    GradientTape, jax.value_and_grad over ``stateless_call``, torch's ``backward``)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) + sum(model.losses)
        grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
        optimizer.apply(grads, model.trainable_variables)
    elif BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(values):
            out, new_non_trainable = model.stateless_call(values, non_trainable, x, training=True)
            return loss_fn(y, out), new_non_trainable

        (_, new_non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        optimizer.apply(grads, model.trainable_variables)
        for variable, value in zip(model.non_trainable_variables, new_non_trainable):
            variable.assign(value)
    elif BACKEND == "torch":
        for variable in model.trainable_variables:
            variable.value.grad = None
        loss = loss_fn(y, model(x, training=True)) + sum(model.losses)
        loss.backward()
        optimizer.apply([v.value.grad for v in model.trainable_variables],
                        model.trainable_variables)
    else:
        pytest.skip(f"no custom loop for backend {BACKEND}")
