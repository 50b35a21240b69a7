"""N:M sparsity with the std rule on tf_keras: training, strip, save and TFLite keep it."""
import numpy as np
import pytest
import tensorflow as tf
from reference import fit_briefly, reference_m_by_n_step

import tf_stdprune
from tf_stdprune.keras2.engine import keras

L = keras.layers


def _model():
    return keras.Sequential([L.Conv2D(8, 3, input_shape=(6, 6, 6), name="conv"),
                             L.BatchNormalization(name="bn"), L.ReLU(), L.Flatten(),
                             L.Dense(3, name="dense")])


def _pruned(qualities=(0.4, 0.8)):
    schedule = tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration=2)
    return tf_stdprune.prune_low_std(_model(), pruning_schedule=schedule, sparsity_m_by_n=(2, 4),
                                     prune_batchnorm=False)


def test_a_pruning_step_follows_the_n_m_then_std_oracle():
    """One mask update equals the oracle: N:M first, then q * sigma_0 on what is left."""
    model = _pruned()
    for wrapper in [l for l in model.layers if isinstance(l, tf_stdprune.PruneLowStd)]:
        kernel = wrapper.layer.kernel.numpy()
        wrapper.pruning_obj.update_masks(0.6)
        expected, sigma = reference_m_by_n_step(kernel, np.ones(kernel.shape, bool), 0.6,
                                                "initial", 2, 4)
        np.testing.assert_array_equal(wrapper.pruning_vars[0][1].numpy().astype(bool), expected)
        np.testing.assert_allclose(float(wrapper.sigmas[0].numpy()), sigma, rtol=1e-5)


def test_fit_strip_save_and_tflite_keep_the_2_of_4_pattern(tmp_path):
    """After fit the stripped model, its .keras reload and its TFLite weights are 2:4."""
    model = fit_briefly(_pruned(), keras, (6, 6, 6), 3)
    stripped = tf_stdprune.strip_pruning(model)
    assert tf_stdprune.check_m_by_n_sparsity(stripped, 2, 4)
    zeros = np.mean(stripped.get_layer("dense").kernel.numpy() == 0)
    assert zeros > 0.5  # the std step pruned beyond the N:M half
    stripped.save(tmp_path / "m.keras")
    assert tf_stdprune.check_m_by_n_sparsity(keras.models.load_model(tmp_path / "m.keras"), 2, 4)
    path = tf_stdprune.export_tflite(stripped, tmp_path / "m.tflite", sparse=False)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    kernels = {tuple(d["shape"]): interpreter.get_tensor(d["index"])
               for d in interpreter.get_tensor_details() if len(d["shape"]) in (2, 4)
               and d["dtype"] == np.float32 and tuple(d["shape"]) in ((8, 3, 3, 6), (3, 128))}
    assert len(kernels) == 2
    # TFLite stores kernels input-last: [out, h, w, in] and [out, in]
    assert tf_stdprune.check_m_by_n_sparsity(np.transpose(kernels[(8, 3, 3, 6)], (1, 2, 3, 0)), 2, 4)
    assert tf_stdprune.check_m_by_n_sparsity(kernels[(3, 128)].T, 2, 4)
    np.testing.assert_array_equal(kernels[(3, 128)].T, stripped.get_layer("dense").kernel.numpy())


def test_m_by_n_settings_are_checked_and_kept_in_the_config():
    """Bad values and block_size together raise; the config round-trips (m, n)."""
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
        tf_stdprune.prune_low_std(_model(), sparsity_m_by_n=(4, 2))
    with pytest.raises(ValueError, match="block_size"):
        tf_stdprune.prune_low_std(_model(), sparsity_m_by_n=(2, 4), block_size=(1, 4))
    with pytest.raises(ValueError, match="prune_batchnorm=False"):
        tf_stdprune.prune_low_std(_model(), sparsity_m_by_n=(2, 4))
    wrapper = _pruned().layers[0]
    clone = tf_stdprune.PruneLowStd.from_config(wrapper.get_config())
    assert clone.sparsity_m_by_n == (2, 4)
