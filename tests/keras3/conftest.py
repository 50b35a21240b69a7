"""Keras 3 tests: run under the backend that KERAS_BACKEND names (tensorflow by default).

CI runs this folder twice: within the whole suite (TensorFlow backend) and alone with
``KERAS_BACKEND=jax``. Nothing here imports tf_keras or tfmot.
"""
import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():  # replaces the tf_keras suite's fixture of the same name
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=64)
    return x, y
