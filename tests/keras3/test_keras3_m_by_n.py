"""N:M sparsity with the std rule on Keras 3 (any backend): the oracle, fit, strip, save."""
import keras
import numpy as np
import pytest
from reference import fit_briefly, reference_m_by_n_step

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers


def _model():
    return keras.Sequential([keras.Input((6, 6, 6)), keras.layers.Conv2D(8, 3, name="conv"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="dense")])


def _pruned():
    schedule = tf_stdprune.StdPruningSchedule([0.4, 0.8], steps_per_iteration=2)
    return tf_stdprune.prune_low_std(_model(), pruning_schedule=schedule,
                                     sparsity_m_by_n=(2, 4), prune_batchnorm=False)


@pytest.mark.parametrize("std_mode", ["initial", "surviving"])
def test_update_masks_follows_the_n_m_then_std_oracle(std_mode):
    """Two mask updates equal the oracle's: N:M first, then q * sigma on what is left."""
    model = tf_stdprune.prune_low_std(_model(), sparsity_m_by_n=(2, 4), prune_batchnorm=False,
                                      std_mode=std_mode)
    for wrapper in wrappers(model):
        kernel = keras.ops.convert_to_numpy(wrapper.layer.kernel)
        expected, initial = np.ones(kernel.shape, bool), None
        for q in (0.5, 0.9):
            wrapper.update_masks(q)
            expected, sigma = reference_m_by_n_step(kernel, expected, q, std_mode, 2, 4, initial)
            initial = initial if initial is not None else sigma
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(wrapper.masks[0]).astype(bool), expected)


def test_fit_strip_and_save_keep_the_2_of_4_pattern(tmp_path):
    """After fit the stripped model and its .keras reload are 2:4 and pruned further."""
    model = fit_briefly(_pruned(), keras, (6, 6, 6), 3)
    assert tf_stdprune.check_m_by_n_sparsity(model, 2, 4)
    stripped = tf_stdprune.strip_pruning(model)
    assert tf_stdprune.check_m_by_n_sparsity(stripped, 2, 4)
    assert np.mean(keras.ops.convert_to_numpy(stripped.get_layer("dense").kernel) == 0) > 0.5
    stripped.save(tmp_path / "m.keras")
    assert tf_stdprune.check_m_by_n_sparsity(keras.saving.load_model(tmp_path / "m.keras"), 2, 4)
    # a wrapped model saves and reloads with its N:M setting
    model.save(tmp_path / "wrapped.keras")
    reloaded = keras.saving.load_model(tmp_path / "wrapped.keras")
    assert all(w.sparsity_m_by_n == (2, 4) for w in wrappers(reloaded))


def test_m_by_n_refuses_batchnorm_gammas_naming_the_fix():
    with pytest.raises(ValueError, match="prune_batchnorm=False"):
        tf_stdprune.prune_low_std(_model(), sparsity_m_by_n=(2, 4))


def test_strip_pruning_of_a_functional_model_with_a_residual_gives_the_masked_layers():
    """A functional model (wrapped Conv2D whose call takes no mask) strips to plain layers
    holding w * m, and the pruned model still calls as before."""
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Add()([keras.layers.Conv2D(3, 1, name="c")(inputs), inputs])
    pruned = tf_stdprune.prune_low_std(keras.Model(inputs, outputs))
    (wrapper,) = wrappers(pruned)
    wrapper.update_masks(1.0)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    stripped = tf_stdprune.strip_pruning(pruned)
    assert not wrappers(stripped)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(stripped(x)),
                               keras.ops.convert_to_numpy(pruned(x)), atol=1e-6)
    kernel = keras.ops.convert_to_numpy(stripped.get_layer("c").kernel)
    np.testing.assert_array_equal(kernel == 0, keras.ops.convert_to_numpy(wrapper.masks[0]) == 0)
    tf_stdprune.strip_pruning(pruned)  # the wrapped model's recorded calls are intact


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite needs TensorFlow")
def test_export_tflite_keeps_the_2_of_4_pattern_in_tflite_layout(tmp_path):
    """The flatbuffer's kernels ([out, h, w, in], [out, in]) are 2:4 along their last axis."""
    from tf_stdprune.compression import litert

    stripped = tf_stdprune.strip_pruning(fit_briefly(_pruned(), keras, (6, 6, 6), 3))
    path = tf_stdprune.export_tflite(stripped, tmp_path / "m.tflite", sparse=False)
    with open(path, "rb") as f:
        kernels = {a.shape: a for a in litert.constant_tensors(f.read()).values()}
    assert tf_stdprune.check_m_by_n_sparsity(np.transpose(kernels[(8, 3, 3, 6)], (1, 2, 3, 0)),
                                             2, 4)
    np.testing.assert_array_equal(kernels[(3, 128)].T,
                                  keras.ops.convert_to_numpy(stripped.get_layer("dense").kernel))
