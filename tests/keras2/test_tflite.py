"""TFLite export: float outputs equal Keras's, sparse files are smaller, int8 is full-integer
and keeps top-1, the model is not changed, and bad input gets an error naming the fix."""
import os

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.quantize import quantize_weights
from tf_stdprune.keras2.tflite import export_tflite, run_tflite

from test_quantize import zero_out


def small_cnn():
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10),
    ])


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (data.images / 16.0).astype("float32")[..., None], data.target


def _trained_pruned(digits):
    """Trained, the 70 % smallest |w| of each kernel zeroed, trained again and zeroed
    again (a tiny stand-in for prune_low_std's outcome)."""
    keras.utils.set_random_seed(0)
    x, y = digits
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for epochs in (6, 2):
        model.fit(x[:1200], y[:1200], epochs=epochs, batch_size=32, verbose=0)
        for layer in model.layers:
            if hasattr(layer, "kernel"):
                w = layer.kernel.numpy()
                w[np.abs(w) < np.quantile(np.abs(w), 0.7)] = 0.0
                layer.kernel.assign(w)
    return model


def test_float_tflite_equals_keras_within_1e5_and_sparse_is_smaller_than_dense(tmp_path,
                                                                                digits):
    model = zero_out(small_cnn(), 0.9)
    x = digits[0][:16]
    sparse = export_tflite(model, tmp_path / "sparse.tflite")
    dense = export_tflite(model, tmp_path / "dense.tflite", sparse=False)
    expected = model(x, training=False).numpy()
    for path in (sparse, dense):
        with open(path, "rb") as f:
            outputs = run_tflite(f.read(), x)
        np.testing.assert_allclose(outputs[0], expected, atol=1e-5)
    assert os.path.getsize(sparse) * 3 < os.path.getsize(dense)


def test_int8_tflite_is_full_integer_and_keeps_the_float_top1(tmp_path, digits):
    model = _trained_pruned(digits)
    x, y = digits
    path = export_tflite(model, tmp_path / "int8.tflite", int8=True,
                         representative_data=x[:200])
    with open(path, "rb") as f:
        flatbuffer = f.read()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    io_indices = {d["index"] for d in interpreter.get_input_details()
                  + interpreter.get_output_details()}
    kinds = {d["dtype"] for d in interpreter.get_tensor_details() if d["index"] not in io_indices
             and d["shape"].size and d["name"] and "dequantize" not in d["name"].lower()}
    assert np.int8 in kinds and np.float32 not in kinds, kinds
    test_x, test_y = x[1200:], y[1200:]
    float_top1 = np.mean(np.argmax(model(test_x).numpy(), 1) == test_y)
    int8_top1 = np.mean(np.argmax(run_tflite(flatbuffer, test_x)[0], 1) == test_y)
    assert float_top1 > 0.8
    assert abs(int8_top1 - float_top1) <= 0.02, (int8_top1, float_top1)


def test_exporting_a_quantized_or_pruned_model_leaves_it_unchanged(tmp_path, digits):
    x = digits[0][:8]
    quantized = quantize_weights(zero_out(small_cnn(), 0.9), bits=3)
    pruned = tf_stdprune.prune_low_std(zero_out(small_cnn(), 0.9))
    for k, model in enumerate((quantized, pruned)):
        before = [w.numpy().copy() for w in model.weights]
        path = export_tflite(model, tmp_path / f"m{k}.tflite")
        assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
        with open(path, "rb") as f:
            np.testing.assert_allclose(run_tflite(f.read(), x)[0],
                                       model(x, training=False).numpy(), atol=1e-5)


def test_bad_input_gets_an_error_that_names_the_fix(tmp_path, digits):
    model = zero_out(small_cnn(), 0.9)
    with pytest.raises(ValueError, match="int8=True needs representative_data"):
        export_tflite(model, tmp_path / "a.tflite", int8=True)
    with pytest.raises(ValueError, match=r"representative_data must be .* shape \[n, 8, 8, 1\]"):
        export_tflite(model, tmp_path / "a.tflite", int8=True,
                      representative_data=np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="no pruned weight"):
        export_tflite(small_cnn(), tmp_path / "a.tflite")
    with pytest.raises(ValueError, match="not built"):
        export_tflite(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "a.tflite")
    with pytest.raises(TypeError, match="sparse must be True or False"):
        export_tflite(model, tmp_path / "a.tflite", sparse="yes")
    odd = zero_out(keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                                     keras.layers.Lambda(tf.math.special.bessel_i1e,
                                                         name="odd")]), 0.5)
    with pytest.raises(ValueError, match="layer 'odd' .*BesselI1e.*builtin"):
        export_tflite(odd, tmp_path / "a.tflite")
    assert os.listdir(tmp_path) == []


def test_an_existing_target_is_replaced_only_with_overwrite_and_only_if_it_is_tflite(tmp_path):
    model = zero_out(small_cnn(), 0.9)
    path = export_tflite(model, tmp_path / "m.tflite")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_tflite(model, path)
    export_tflite(zero_out(small_cnn(), 0.8, seed=1), path, overwrite=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        export_tflite(model, tmp_path / "notes.txt", overwrite=True)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_tflite(model, tmp_path / "folder", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["folder", "m.tflite", "notes.txt"]
