"""Shared fixtures: tiny models and data so the whole suite runs in minutes on 2 CPUs."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import socket  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tf_stdprune import registry  # noqa: E402
from tf_stdprune.keras2.engine import keras  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)


def _disable_op_determinism():
    if "tensorflow" in sys.modules:
        # Public TensorFlow can turn op determinism on, not off.
        from tensorflow.python.framework import config
        config.disable_op_determinism()


@pytest.fixture(autouse=True)
def _no_op_determinism():
    """Each test starts and ends with TensorFlow's op determinism off.

    The example's ``main`` (run in-process by its tests and their module fixtures) turns it
    on for the whole process; left on, later XLA-compiled train steps fail, as MaxPool's
    gradient has no deterministic XLA kernel."""
    _disable_op_determinism()
    yield
    _disable_op_determinism()


def tiny_cnn(num_classes=3, input_shape=(8, 8, 3), l2=0.0):
    """Conv-BN-ReLU-pool, then Dense: every kind the reference experiment counts, ~700 parameters."""
    reg = keras.regularizers.l2(l2) if l2 else None
    return keras.Sequential([
        keras.layers.Conv2D(4, 3, padding="same", input_shape=input_shape, kernel_regularizer=reg),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes, kernel_regularizer=reg),
    ])


def tiny_arrays():
    """64 random 8x8x3 images and labels in {0, 1, 2} (seeded: the same every call)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=64)
    return x, y


def fresh_run_inputs(tmp_path_factory):
    """For a module-scoped run: a cleared, seeded session, `tiny_arrays` and a new run dir."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    return (*tiny_arrays(), str(tmp_path_factory.mktemp("run")))


def zero_out(model, fraction, seed=0):
    """Sets a random ``fraction`` of every kernel / BN gamma to 0 (numpy, in place)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for attribute in registry.prunable_attributes(layer) or []:
            variable = getattr(layer, attribute)
            value = variable.numpy()
            if attribute == "gamma":
                value = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
            value[rng.random(value.shape) < fraction] = 0.0
            variable.assign(value)
    return model


def free_port():
    """A TCP port on localhost that nothing listens on now (for multi-worker TF_CONFIG)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_data():
    return tiny_arrays()
