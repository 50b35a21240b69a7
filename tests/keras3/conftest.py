"""Keras 3 tests: run under the backend that KERAS_BACKEND names (tensorflow by default).

CI runs this folder twice: within the whole suite (TensorFlow backend) and alone with
``KERAS_BACKEND=jax``. Nothing here imports tf_keras or tfmot; ``tiny_data`` (NumPy
arrays) comes from the parent folder's conftest.
"""
import keras
import pytest


@pytest.fixture(autouse=True)
def _seed():  # replaces the tf_keras suite's fixture of the same name
    keras.backend.clear_session(free_memory=False)  # names restart; no full GC per test
    keras.utils.set_random_seed(0)
