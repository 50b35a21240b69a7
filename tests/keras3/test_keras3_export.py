"""Keras 3 SavedModel export: the sparse and dense exports of tf_stdprune and Keras 3's own
``model.export`` give the Keras model's outputs, store pruned tensors sparsely, never change
the model they read, and refuse bad input before writing anything."""
import json
import os

import keras
import numpy as np
import pytest
from keras3.helpers import BACKEND, tiny_cnn

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers

tf = pytest.importorskip("tensorflow")
on_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow",
                                   reason="a SavedModel needs the TensorFlow backend")
MARKER = "tf_stdprune_export.json"


def images(batch=5, shape=(8, 8, 3)):
    return np.random.default_rng(1).normal(size=(batch, *shape)).astype("float32")


def pruned(model=None, quality=1.0):
    """``model`` (default `tiny_cnn`) wrapped, its masks shrunk once with ``q``."""
    wrapped = tf_stdprune.prune_low_std(model or tiny_cnn())
    for wrapper in wrappers(wrapped):
        wrapper.update_masks(quality)
    return wrapped


def weights(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def serve(path, x):
    """The single output of the loaded export's ``serving_default`` on ``x``."""
    outputs = tf.saved_model.load(path).signatures["serving_default"](tf.constant(x))
    (value,) = outputs.values()
    return value.numpy()


def saved_variables(path):
    """``{name: shape}`` of the variables stored in the SavedModel at ``path``."""
    return dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))


@on_tensorflow
def test_the_sparse_export_serves_the_keras_outputs_and_stores_only_the_sparse_form(tmp_path):
    final = tf_stdprune.strip_pruning(pruned())
    x = images()
    sparse = tf_stdprune.export_sparse_saved_model(final, tmp_path / "sparse")
    dense = tf_stdprune.export_dense_saved_model(final, tmp_path / "dense")
    np.testing.assert_allclose(serve(sparse, x), keras.ops.convert_to_numpy(final(x)), atol=1e-5)
    np.testing.assert_allclose(serve(dense, x), keras.ops.convert_to_numpy(final(x)), atol=1e-5)
    stored = saved_variables(sparse)
    kernel = np.asarray(final.get_layer("conv").kernel)
    assert sum("gaps" in name for name in stored) == 3  # conv, BN gamma, dense
    caches = [shape for name, shape in stored.items() if "cache" in name]
    assert len(caches) == 3 and all(shape == [0] for shape in caches)
    assert list(kernel.shape) not in stored.values()  # no dense kernel saved
    assert list(kernel.shape) in saved_variables(dense).values()
    # at most 256 distinct values: one uint8 index per nonzero into a codebook
    indices = sorted(shape[0] for name, shape in stored.items() if "/indices/" in name)
    expected = sorted(np.count_nonzero(final.get_layer(n).get_weights()[0])
                      for n in ("conv", "bn", "dense"))
    assert indices == expected and sum(expected) < 3 * 3 * 3 * 4 + 4 + 64 * 3  # pruned
    marker = json.loads((tmp_path / "sparse" / MARKER).read_text())
    assert marker["format"] == "tf_stdprune sparse SavedModel"


@on_tensorflow
def test_a_wrapped_model_exports_as_its_masked_computation(tmp_path):
    wrapped = pruned()
    x = images()
    path = tf_stdprune.export_sparse_saved_model(wrapped, tmp_path / "sparse")
    np.testing.assert_allclose(serve(path, x), keras.ops.convert_to_numpy(wrapped(x)), atol=1e-5)


def pointwise_model():
    return keras.Sequential([keras.Input((4, 4, 3)),
                             keras.layers.Conv2D(6, 1, activation="relu", name="pointwise"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="dense")])


@on_tensorflow
@pytest.mark.parametrize("batch", [1, 9])  # the COO and the CSR product
def test_sparse_compute_of_a_dense_and_a_pointwise_conv_gives_the_keras_outputs(tmp_path, batch):
    final = tf_stdprune.strip_pruning(pruned(pointwise_model(), quality=0.8))
    x = images(batch, (4, 4, 3))
    path = tf_stdprune.export_sparse_saved_model(final, tmp_path / "sparse", sparse_compute=True)
    np.testing.assert_allclose(serve(path, x), keras.ops.convert_to_numpy(final(x)), atol=1e-5)
    marker = json.loads((tmp_path / "sparse" / MARKER).read_text())
    assert marker["sparse_compute_layers"] == ["pointwise", "dense"]
    stored = saved_variables(path)
    assert sum("transposed_indices" in name for name in stored) == 2


@on_tensorflow
def test_a_quantized_model_exports_its_shared_values_as_a_codebook(tmp_path):
    quantized = tf_stdprune.quantize_weights(tf_stdprune.strip_pruning(pruned()), bits=3)
    x = images()
    path = tf_stdprune.export_sparse_saved_model(quantized, tmp_path / "sparse")
    np.testing.assert_allclose(serve(path, x), keras.ops.convert_to_numpy(quantized(x)),
                               atol=1e-5)
    codebooks = [shape for name, shape in saved_variables(path).items() if "codebook" in name]
    assert len(codebooks) == 3 and all(shape[0] <= 2 ** 3 for shape in codebooks)


def models_to_export():
    wrapped = pruned()
    final = tf_stdprune.strip_pruning(pruned())
    quantized = tf_stdprune.quantize_weights(tf_stdprune.strip_pruning(pruned()), bits=3)
    return {"wrapped": wrapped, "stripped": final, "quantized": quantized}


@on_tensorflow
@pytest.mark.parametrize("kind", ["wrapped", "stripped", "quantized"])
def test_exporting_leaves_the_model_bit_identical(tmp_path, kind):
    model = models_to_export()[kind]
    layers = [type(layer) for layer in model.layers]
    dropout = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    before = weights(model)
    tf_stdprune.export_sparse_saved_model(model, tmp_path / "sparse")
    tf_stdprune.export_dense_saved_model(model, tmp_path / "dense")
    after = weights(model)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert [type(layer) for layer in model.layers] == layers
    assert [layer.rate for layer in model.layers
            if isinstance(layer, keras.layers.Dropout)] == dropout


@on_tensorflow
@pytest.mark.parametrize("kind", ["wrapped", "stripped"])
def test_keras_own_model_export_serves_the_keras_outputs(tmp_path, kind):
    model = models_to_export()[kind]
    x = images()
    model.export(str(tmp_path / "keras_export"))
    loaded = tf.saved_model.load(str(tmp_path / "keras_export"))
    np.testing.assert_allclose(np.asarray(loaded.serve(tf.constant(x))),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-5)


@on_tensorflow
def test_an_existing_directory_that_is_no_export_is_refused_and_kept(tmp_path):
    final = tf_stdprune.strip_pruning(pruned())
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tf_stdprune.export_sparse_saved_model(final, target)
    with pytest.raises(ValueError, match="did not write"):
        tf_stdprune.export_sparse_saved_model(final, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mine"]


@on_tensorflow
def test_an_earlier_export_is_replaced_only_with_overwrite(tmp_path):
    final = tf_stdprune.strip_pruning(pruned())
    path = tf_stdprune.export_dense_saved_model(final, tmp_path / "out")
    with pytest.raises(FileExistsError):
        tf_stdprune.export_sparse_saved_model(final, path)
    assert json.loads((tmp_path / "out" / MARKER).read_text())["format"].endswith(
        "dense SavedModel")
    tf_stdprune.export_sparse_saved_model(final, path, overwrite=True)
    assert json.loads((tmp_path / "out" / MARKER).read_text())["format"].endswith(
        "sparse SavedModel")


@on_tensorflow
def test_an_unbuilt_model_is_refused_with_the_fix_and_nothing_is_written(tmp_path):
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="keras.Input"):
        tf_stdprune.export_dense_saved_model(unbuilt, tmp_path / "out")
    assert os.listdir(tmp_path) == []


@on_tensorflow
def test_an_unpruned_model_is_refused_by_the_sparse_export(tmp_path):
    with pytest.raises(ValueError, match="no pruned weight"):
        tf_stdprune.export_sparse_saved_model(tiny_cnn(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_tf_keras_object_mixed_in_is_refused_and_nothing_is_written(tmp_path):
    # Stands for a tf_keras model without loading tf_keras: the routing reads the module
    # of the object's classes.
    tf_keras_model = type("Sequential", (), {"__module__": "tf_keras.src.engine.sequential",
                                             "name": "other"})()
    for export in (tf_stdprune.export_sparse_saved_model, tf_stdprune.export_dense_saved_model):
        with pytest.raises(TypeError, match="mixes tf_keras and Keras 3"):
            export([tiny_cnn(), tf_keras_model], tmp_path / "out")
    from tf_stdprune.keras3.export import private_plain_copy
    with pytest.raises(TypeError, match="Keras 3 Model"):
        private_plain_copy(tf_keras_model)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the TensorFlow backend can export")
def test_another_backend_gets_a_clear_error_and_nothing_is_written(tmp_path):
    final = tf_stdprune.strip_pruning(pruned())
    for export in (tf_stdprune.export_sparse_saved_model, tf_stdprune.export_dense_saved_model):
        with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow") as error:
            export(final, tmp_path / "out")
        assert BACKEND in str(error.value)
        assert ("format='tf_saved_model'" in str(error.value)) == (BACKEND == "jax")
    assert os.listdir(tmp_path) == []
    if BACKEND != "jax":
        return
    # on JAX the alternative the message names works: Keras 3's own dense SavedModel
    final.export(str(tmp_path / "keras_export"), format="tf_saved_model")
    loaded = tf.saved_model.load(str(tmp_path / "keras_export"))
    x = images()
    np.testing.assert_allclose(np.asarray(loaded.serve(tf.constant(x))),
                               keras.ops.convert_to_numpy(final(x)), atol=1e-5)


@on_tensorflow
def test_a_mixed_precision_model_exports_with_its_kernels_read_in_float16(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        final = tf_stdprune.strip_pruning(pruned())
    finally:
        keras.config.set_dtype_policy("float32")
    x = images()
    path = tf_stdprune.export_sparse_saved_model(final, tmp_path / "sparse")
    served = serve(path, x)
    assert served.dtype == np.float16
    np.testing.assert_array_equal(served, keras.ops.convert_to_numpy(final(x)))
