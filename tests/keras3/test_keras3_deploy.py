"""Keras 3 deployment: export_tflite, and Keras's own LiteRT and ONNX exports of a stripped
model, keep every pruned zero; the weights are read back from each artifact."""
import itertools

import keras
import numpy as np
import pytest
from keras3.helpers import BACKEND

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers

tf = pytest.importorskip("tensorflow")
on_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow",
                                   reason="TFLite export needs the TensorFlow backend here")


def stripped(quality=0.8):
    """A Conv-ReLU-pool-Dense model (no BatchNormalization, which converters fold into
    the kernels), pruned once with ``q`` and stripped."""
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3, name="conv"),
                              keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(4, name="dense")])
    pruned = tf_stdprune.prune_low_std(model)
    for wrapper in wrappers(pruned):
        wrapper.update_masks(quality)
    return tf_stdprune.strip_pruning(pruned)


def kernels(model):
    return {name: np.asarray(keras.ops.convert_to_numpy(model.get_layer(name).kernel))
            for name in ("conv", "dense")}


def stored_as(kernel, candidates):
    """The candidate array that is ``kernel`` with its axes permuted, or None."""
    for candidate in candidates:
        if candidate.size != kernel.size or candidate.ndim != kernel.ndim:
            continue
        for perm in itertools.permutations(range(kernel.ndim)):
            if candidate.transpose(perm).shape == kernel.shape and np.array_equal(
                    candidate.transpose(perm), kernel):
                return candidate
    return None


def assert_every_kernel_stored_exactly(model, arrays):
    for name, kernel in kernels(model).items():
        assert np.mean(kernel == 0) > 0.2, name  # the model is pruned
        found = stored_as(kernel, arrays)
        assert found is not None, f"{name} is not stored as it is in the model"
        assert np.count_nonzero(found == 0) == np.count_nonzero(kernel == 0)


def images():
    return np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype("float32")


@on_tensorflow
def test_export_tflite_serves_the_keras_outputs_and_stores_zeros_sparsely(tmp_path):
    from tf_stdprune.compression import litert

    model = stripped()
    dense = tf_stdprune.export_tflite(model, tmp_path / "dense.tflite", sparse=False)
    sparse = tf_stdprune.export_tflite(model, tmp_path / "sparse.tflite")
    expected = keras.ops.convert_to_numpy(model(images()))
    for path in (dense, sparse):
        with open(path, "rb") as f:
            np.testing.assert_allclose(litert.run_tflite(f.read(), images())[0], expected,
                                       atol=1e-5)
    with open(dense, "rb") as f:
        assert_every_kernel_stored_exactly(model, litert.constant_tensors(f.read()).values())
    with open(sparse, "rb") as f:
        assert litert.sparse_tensor_count(f.read()) >= 1


@on_tensorflow
def test_export_tflite_leaves_a_wrapped_model_unchanged_and_refuses_bad_input(tmp_path):
    model = tf_stdprune.prune_low_std(stripped())
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
    tf_stdprune.export_tflite(model, tmp_path / "w.tflite")
    after = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    with pytest.raises(FileExistsError):
        tf_stdprune.export_tflite(model, tmp_path / "w.tflite")
    with pytest.raises(ValueError, match="representative_data"):
        tf_stdprune.export_tflite(model, tmp_path / "i.tflite", int8=True)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the refusal is for other backends")
def test_export_tflite_refuses_other_backends_naming_tensorflow(tmp_path):
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        tf_stdprune.export_tflite(stripped(), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


@on_tensorflow
def test_keras_litert_export_of_a_stripped_model_keeps_every_zero(tmp_path):
    from tf_stdprune.compression import litert

    model = stripped()
    path = str(tmp_path / "keras.tflite")
    model.export(path, format="litert", verbose=False)
    with open(path, "rb") as f:
        assert_every_kernel_stored_exactly(model, litert.constant_tensors(f.read()).values())


@pytest.mark.skipif(BACKEND not in ("tensorflow", "jax"), reason="ONNX: tf2onnx or jax2onnx")
def test_keras_onnx_export_of_a_stripped_model_keeps_every_zero(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("tf2onnx" if BACKEND == "tensorflow" else "jax2onnx")
    from onnx import numpy_helper

    model = stripped()
    model(images())  # Keras's ONNX export takes only a model that has been called
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    graph = onnx.load(path).graph
    arrays = [numpy_helper.to_array(t) for t in graph.initializer]
    arrays += [numpy_helper.to_array(a.t) for node in graph.node if node.op_type == "Constant"
               for a in node.attribute if a.name == "value"]
    assert_every_kernel_stored_exactly(model, arrays)
