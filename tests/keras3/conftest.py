"""Keras 3 tests: run under the backend that KERAS_BACKEND names (tensorflow by default).

CI runs this folder twice: within the whole suite (TensorFlow backend) and alone with
``KERAS_BACKEND=jax``. Nothing here imports tf_keras or tfmot.
"""
import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _seed():  # replaces the tf_keras suite's fixture of the same name
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)


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


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=64)
    return x, y
