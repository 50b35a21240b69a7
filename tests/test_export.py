"""Sparse SavedModel: same outputs as the dense model in a process without tf_stdprune,
>= 5x smaller at 90 % zeros, only sparse variables saved, atomic and non-clobbering."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tf_stdprune._keras import keras
from tf_stdprune.export import disk_size, export_dense_saved_model, export_sparse_saved_model
from tf_stdprune.quantize import quantize_weights, strip_quantization

from test_quantize import zero_out

SERVE_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
outputs = {name: list(serve(tf.constant(np.load(name + ".npy"))).values())[0].numpy().tolist()
           for name in ("random", "digits")}
outputs["imported_tf_stdprune"] = any(m.startswith("tf_stdprune") for m in sys.modules)
print(json.dumps(outputs))
"""


def digits_cnn():
    """8x8x1 digits: conv-BN-ReLU twice, then Dense 4096 -> 512 -> 10 (~2.1M weights)."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(64, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(10),
    ])


@pytest.fixture
def inputs():
    digits = (load_digits().images[:32] / 16.0).astype("float32")[..., None]
    return {"random": np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32"),
            "digits": digits}


def _checkpoint_shapes(path):
    return [tuple(shape) for _, shape in tf.train.list_variables(os.path.join(path, "variables",
                                                                              "variables"))]


def test_sparse_saved_model_serves_dense_outputs_without_tf_stdprune(tmp_path, inputs):
    model = zero_out(digits_cnn(), 0.9)
    dense_path = export_dense_saved_model(model, tmp_path / "dense")
    sparse_path = export_sparse_saved_model(model, tmp_path / "sparse")
    for name, x in inputs.items():
        np.save(tmp_path / f"{name}.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, sparse_path], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["imported_tf_stdprune"] is False
    for name, x in inputs.items():
        np.testing.assert_allclose(served[name], model(x, training=False).numpy(), atol=1e-5)

    dense, sparse = disk_size(dense_path), disk_size(sparse_path)
    assert dense["bytes"] / sparse["bytes"] >= 5.0, (dense, sparse)
    assert dense["gzip_bytes"] < dense["bytes"] and sparse["gzip_bytes"] < dense["gzip_bytes"]
    # Only sparse variables: no kernel shape is saved in the sparse checkpoint.
    kernel_shapes = {tuple(w.shape) for w in model.weights if w.name.endswith("kernel:0")}
    assert kernel_shapes <= set(_checkpoint_shapes(dense_path))
    assert not kernel_shapes & set(_checkpoint_shapes(sparse_path))
    nonzeros = sum(int(np.count_nonzero(w.numpy())) for w in model.weights
                   if w.name.endswith(("kernel:0", "gamma:0")))
    others = sum(int(np.prod(w.shape)) for w in model.weights
                 if not w.name.endswith(("kernel:0", "gamma:0")))
    data = os.path.join(sparse_path, "variables", "variables.data-00000-of-00001")
    # float32 value + uint8 gap per nonzero (+ a few fillers), others dense float32.
    expected = 5 * nonzeros + 4 * others
    assert expected <= os.path.getsize(data) <= 1.02 * expected + 4096


def test_quantized_model_is_stored_as_codebook_and_uint8_indices(tmp_path, inputs):
    quantized = strip_quantization(quantize_weights(zero_out(digits_cnn(), 0.9), bits=5))
    path = export_sparse_saved_model(quantized, tmp_path / "sparse")
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    assert tf.uint8 in set(reader.get_variable_to_dtype_map().values())
    nonzeros = sum(int(np.count_nonzero(w.numpy())) for w in quantized.weights
                   if w.name.endswith(("kernel:0", "gamma:0")))
    data = os.path.join(path, "variables", "variables.data-00000-of-00001")
    assert os.path.getsize(data) < 2.2 * nonzeros + 4 * 20000
    serve = tf.saved_model.load(path).signatures["serving_default"]
    for x in inputs.values():
        np.testing.assert_allclose(list(serve(tf.constant(x)).values())[0].numpy(),
                                   quantized(x, training=False).numpy(), atol=1e-5)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = zero_out(keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)]), 0.5)
    target = tmp_path / "model"
    target.mkdir()  # an empty directory may be replaced
    export_sparse_saved_model(model, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_sparse_saved_model(model, target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        export_dense_saved_model(model, tmp_path / "file")
    (target / "stale").write_text("old")
    export_sparse_saved_model(model, target, overwrite=True)
    assert not (target / "stale").exists() and (target / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == ["file", "model"]  # no temporary left behind
    with pytest.raises(ValueError, match="no defined inputs"):
        export_sparse_saved_model(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "x")
