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

import tf_stdprune
from tf_stdprune import io as atomic_io
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.export import (MARKER, SPARSE_MAX_BATCH, disk_size, export_dense_saved_model,
                                export_sparse_saved_model)
from tf_stdprune.keras2.quantize import quantize_weights, strip_quantization

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


def tiny_model(zeros=0.5):
    return zero_out(keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                                      keras.layers.BatchNormalization(),
                                      keras.layers.Dense(3)]), zeros)


def _serve(path, x):
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return list(serve(tf.constant(x)).values())[0].numpy()


def test_overwrite_never_removes_the_working_directory_its_parents_or_a_foreign_directory(
        tmp_path, monkeypatch):
    """The path "" (the working directory) with overwrite=True is refused, not deleted."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in ("", ".", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="working directory"):
            export_sparse_saved_model(tiny_model(), target, overwrite=True)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("jpeg")
    with pytest.raises(ValueError, match="tf_stdprune_export.json"):
        export_sparse_saved_model(tiny_model(), foreign, overwrite=True)
    assert (work / "notes.txt").read_text() == "mine"
    assert (foreign / "a.jpg").read_text() == "jpeg"
    assert sorted(os.listdir(tmp_path)) == ["photos", "work"]


def test_an_empty_working_directory_is_not_replaced_either(tmp_path, monkeypatch):
    """Renaming onto an empty working directory would silently swap the process's cwd."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="working directory"):
        export_sparse_saved_model(tiny_model(), "")
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_earlier_export_which_carries_the_marker(tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    first, second = tiny_model(0.5), zero_out(tiny_model(0.0), 0.7, seed=3)
    path = export_sparse_saved_model(first, tmp_path / "m")
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    assert marker["format"] == "tf_stdprune sparse SavedModel" and marker["version"] >= 2
    export_sparse_saved_model(second, path, overwrite=True)
    np.testing.assert_allclose(_serve(path, x), second(x, training=False).numpy(), atol=1e-5)


def test_exporting_a_quantized_or_pruned_model_leaves_its_weights_bit_identical(tmp_path):
    """Stripping a quantized model writes the shared values into its inner kernels; the
    export must do that on a copy only."""
    quantized = quantize_weights(tiny_model(0.5), bits=2)
    pruned = tf_stdprune.prune_low_std(tiny_model(0.5))
    for k, model in enumerate((quantized, pruned)):
        before = [w.numpy().copy() for w in model.weights]
        export_sparse_saved_model(model, tmp_path / f"q{k}")
        export_dense_saved_model(model, tmp_path / f"d{k}")
        after = [w.numpy() for w in model.weights]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    inner = [w for w in quantized.weights if w.name.endswith("/kernel:0")]
    assert len(np.unique(inner[0].numpy())) > 5  # still the original, unclustered kernel
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(_serve(tmp_path / "q0", x), quantized(x).numpy(), atol=1e-5)


def test_a_kill_between_the_two_renames_leaves_the_old_export_restorable(tmp_path, monkeypatch):
    """os.replace fails after the old export was moved aside; the old one comes back."""
    x = np.random.default_rng(4).normal(size=(3, 6)).astype("float32")
    old = tiny_model(0.5)
    path = export_sparse_saved_model(old, tmp_path / "m")
    real_replace, calls = os.replace, []

    def dying_replace(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(source, target)

    monkeypatch.setattr(atomic_io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        export_sparse_saved_model(zero_out(tiny_model(0.0), 0.7, seed=5), path, overwrite=True)
    monkeypatch.setattr(atomic_io.os, "replace", real_replace)
    assert not os.path.exists(path)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".m.old-")]
    assert len(leftovers) == 1
    assert atomic_io.clean_temporaries(str(tmp_path), target_name="m")
    assert os.listdir(tmp_path) == ["m"]
    np.testing.assert_allclose(_serve(path, x), old(x, training=False).numpy(), atol=1e-5)


def test_the_next_export_restores_an_old_export_left_aside_before_checking_the_target(tmp_path):
    path = export_sparse_saved_model(tiny_model(), tmp_path / "m")
    os.rename(path, tmp_path / ".m.old-abc123")  # as a kill between the renames leaves it
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_sparse_saved_model(tiny_model(), path)
    assert os.listdir(tmp_path) == ["m"]


def test_loading_decodes_the_kernels_once_into_caches_that_are_saved_empty(tmp_path):
    """The saved caches hold no values; plain tf.saved_model.load fills them before any
    call, and calls read only them: overwriting the sparse variables with zeros after
    the load leaves the outputs unchanged."""
    model = tiny_model(0.5)
    path = export_sparse_saved_model(model, tmp_path / "m")
    cache_sizes = [shape for name, shape in tf.train.list_variables(
        os.path.join(path, "variables", "variables")) if "cache" in name]
    assert cache_sizes and all(shape == [0] for shape in cache_sizes)
    loaded = tf.saved_model.load(path)
    sizes = [int(np.prod(w.shape)) for l in model.layers for w in l.weights
             if w.name.split("/")[-1].split(":")[0] in ("kernel", "gamma")]
    assert [int(tf.size(t.cache)) for t in loaded.tensors] == sizes  # filled by the load
    for tensor in loaded.tensors:
        for name in ("gaps", "values", "codebook", "indices"):
            if hasattr(tensor, name):
                getattr(tensor, name).assign(tf.zeros_like(getattr(tensor, name)))
    serve = loaded.signatures["serving_default"]
    x = np.random.default_rng(6).normal(size=(4, 6)).astype("float32")
    expected = model(x, training=False).numpy()
    for _ in range(2):
        np.testing.assert_allclose(list(serve(tf.constant(x)).values())[0], expected, atol=1e-5)


def test_sparse_compute_true_matches_the_keras_outputs_and_is_recorded(tmp_path, inputs):
    model = zero_out(digits_cnn(), 0.9)
    path = export_sparse_saved_model(model, tmp_path / "m", sparse_compute=True)
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    assert marker["sparse_compute_layers"] == ["dense", "dense_1"]
    for x in inputs.values():
        np.testing.assert_allclose(_serve(path, x), model(x, training=False).numpy(), atol=1e-4)


def test_sparse_compute_auto_uses_sparse_only_for_large_very_sparse_dense_layers(tmp_path):
    """A 1024x1024 kernel at 97 % zeros computes sparsely, as COO at batch <=
    SPARSE_MAX_BATCH and as CSR above; both give the Keras outputs. 1024x4 stays dense."""
    model = zero_out(keras.Sequential([keras.Input((1024,)),
                                       keras.layers.Dense(1024, activation="relu"),
                                       keras.layers.Dense(4)]), 0.97)
    path = export_sparse_saved_model(model, tmp_path / "m", sparse_compute="auto")
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    assert marker["sparse_compute_layers"] == [model.layers[0].name]
    rng = np.random.default_rng(7)
    for batch in (1, SPARSE_MAX_BATCH, SPARSE_MAX_BATCH + 3):
        x = rng.normal(size=(batch, 1024)).astype("float32")
        np.testing.assert_allclose(_serve(path, x), model(x, training=False).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_sparse_compute_takes_pointwise_convolutions_too_and_matches_keras(tmp_path):
    """A 1x1 stride-1 Conv2D computes sparsely (COO on a 2x2 map at batch 1: 4 rows; CSR
    on 3 maps of 5x5); a strided 1x1 and a 3x3 convolution keep the dense cache."""
    model = zero_out(keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(8, 1, activation="relu", name="pointwise"),
        keras.layers.Conv2D(8, 1, strides=2, name="strided"),
        keras.layers.Conv2D(8, 3, padding="same", name="conv3x3"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, name="head")]), 0.6)
    path = export_sparse_saved_model(model, tmp_path / "m", sparse_compute=True)
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    assert marker["sparse_compute_layers"] == ["pointwise", "head"]
    rng = np.random.default_rng(3)
    for shape in ((1, 2, 2, 3), (3, 5, 5, 3)):
        x = rng.normal(size=shape).astype("float32")
        np.testing.assert_allclose(_serve(path, x), model(x, training=False).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_bad_input_gets_an_error_that_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="sparse_compute must be 'auto', True or False"):
        export_sparse_saved_model(tiny_model(), tmp_path / "a", sparse_compute="yes")
    with pytest.raises(ValueError, match="no pruned weight.*prune_low_std"):
        export_sparse_saved_model(tiny_model(0.0), tmp_path / "b")
    export_dense_saved_model(tiny_model(0.0), tmp_path / "dense_is_fine")
    with pytest.raises(ValueError, match="not built"):
        export_sparse_saved_model(keras.Sequential([keras.layers.Dense(2)]), tmp_path / "c")
    with pytest.raises(TypeError, match="tf_keras Model"):
        export_sparse_saved_model("model.h5", tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["dense_is_fine"]
