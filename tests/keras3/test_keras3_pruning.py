"""Keras 3 pruning on the backend under test: the rule, masked gradients, zeroed slots,
exact stored zeros in fit and custom loops, saving, stripping and the report."""
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras3.helpers import BACKEND, IMPORT_CHECK, tiny_cnn, train_step
from reference import reference_step

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers
from tf_stdprune.keras3.wrapper import PruneLowStd, optimizer_slots


def schedule(qualities=(0.6, 1.0), steps=4):
    return tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration=steps)


def pruned_weights(model):
    """``[(wrapper, variable value, mask value)]`` as numpy arrays."""
    return [(w, np.asarray(v), np.asarray(m)) for w in wrappers(model)
            for v, m in zip(w.pruned_weights, w.masks)]


def assert_exactly_sparse(model):
    for wrapper, value, mask in pruned_weights(model):
        assert set(np.unique(mask)) <= {0.0, 1.0}, wrapper.name
        assert np.all(value[mask == 0] == 0.0), wrapper.name


@IMPORT_CHECK
def test_importing_the_package_loads_neither_tf_keras_nor_tfmot_nor_sets_the_environment():
    """Nor does pruning a Keras 3 model, or importing the Keras 3 exports."""
    code = ("import os, sys, tf_stdprune, tf_stdprune.keras3.export, keras; "
            "m = keras.Sequential([keras.Input((3,)), "
            "keras.layers.Dense(2)]); tf_stdprune.prune_low_std(m); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('tf_keras', 'tensorflow_model_optimization')), "
            "os.environ.get('TF_USE_LEGACY_KERAS'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[] None"


@pytest.mark.parametrize("std_mode", ["initial", "surviving", "all"])
def test_update_masks_follows_the_numpy_reference_and_masks_only_shrink(std_mode):
    layer = PruneLowStd(keras.layers.Dense(32), schedule(), std_mode=std_mode, layer_quality=1.5)
    layer(np.ones((1, 16), "float32"))
    rng = np.random.default_rng(1)
    mask, initial = np.ones((16, 32), bool), None
    for q in (0.2, 0.5, 0.3):
        weights = rng.normal(size=(16, 32)).astype("float32") * mask
        layer.pruned_weights[0].assign(weights)
        layer.update_masks(q)
        mask, sigma = reference_step(weights, mask, q * 1.5, std_mode, initial)
        initial = initial if initial is not None else sigma
        np.testing.assert_array_equal(np.asarray(layer.masks[0]), mask.astype("float32"))
        np.testing.assert_allclose(float(layer.sigmas[0]), sigma, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(layer.pruned_weights[0]), weights * mask)


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd_clipnorm": lambda: keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1),
    "sgd_global_clipnorm": lambda: keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=0.1),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fit_keeps_pruned_weights_exactly_zero_and_their_slots_zero(name, tiny_data):
    x, y = tiny_data
    model = tf_stdprune.prune_low_std(tiny_cnn(l2=1e-3), pruning_schedule=schedule())
    model.compile(OPTIMIZERS[name](), "sparse_categorical_crossentropy")
    masks_before = None
    for epoch in range(3):  # 4 steps per epoch: prunes at steps 0, 4, 8
        model.fit(x, y, batch_size=16, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
        assert_exactly_sparse(model)
        masks = [m for _, _, m in pruned_weights(model)]
        if masks_before is not None:
            assert all(np.all(new <= old) for new, old in zip(masks, masks_before))
        masks_before = masks
        for wrapper, _, mask in pruned_weights(model):
            for variable in wrapper.pruned_weights:
                for slot in optimizer_slots(model.optimizer, variable):
                    assert np.all(np.asarray(slot)[mask == 0] == 0.0)
    conv_zeros = 1 - masks_before[0].mean()
    assert conv_zeros > 0.3
    assert int(model.optimizer.iterations) == 12


def test_gradients_are_exactly_zero_at_pruned_positions():
    layer = PruneLowStd(keras.layers.Dense(8), schedule())
    model = keras.Sequential([keras.Input((6,)), layer])
    layer.update_masks(1.0)
    mask = np.asarray(layer.masks[0])
    assert 0 < (mask == 0).sum() < mask.size
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    gradient = _kernel_gradient(model, layer, x)
    assert np.all(gradient[mask == 0] == 0.0) and np.any(gradient[mask == 1] != 0.0)


def _kernel_gradient(model, layer, x):
    """d(sum(model(x)^2))/d(kernel), with the backend's own autodiff."""
    kernel = layer.pruned_weights[0]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(keras.ops.square(model(x)))
        return np.asarray(tape.gradient(loss, kernel.value))
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        index = next(i for i, v in enumerate(model.trainable_variables) if v is kernel)

        def loss(values):
            out, _ = model.stateless_call(values, non_trainable, x)
            return keras.ops.sum(keras.ops.square(out))

        return np.asarray(jax.grad(loss)(trainable)[index])
    if BACKEND == "torch":
        out = model(x)
        keras.ops.sum(keras.ops.square(out)).backward()
        return kernel.value.grad.cpu().numpy()
    pytest.skip(f"no gradient helper for backend {BACKEND}")


def test_custom_training_loop_keeps_pruned_weights_zero(tiny_data):
    """A loop written with the backend's own autodiff: pruning via update_masks, then plain
    optimizer steps; pruned weights never move."""
    x, y = tiny_data
    model = tf_stdprune.prune_low_std(tiny_cnn(l2=1e-3), pruning_schedule=schedule())
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for step in range(6):
        if step in (0, 3):
            for wrapper in wrappers(model):
                wrapper.update_masks(0.8 if step else 0.5, optimizer)
        before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        batch = slice(8 * step, 8 * step + 8)
        train_step(model, optimizer, loss_fn, x[batch], y[batch])
        assert_exactly_sparse(model)
        assert all(np.any(keras.ops.convert_to_numpy(v) != b)  # every tensor trained
                   for v, b in zip(model.trainable_variables, before))


def test_saved_keras_file_reloads_and_training_continues_bit_for_bit(tmp_path, tiny_data):
    """Without Dropout: Keras 3 does not save a Dropout layer's random state in .keras."""
    x, y = tiny_data

    def fit(model, epoch):
        model.fit(x, y, batch_size=16, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                  shuffle=False, callbacks=[tf_stdprune.UpdatePruningStep()])

    dense = keras.Sequential([keras.Input((8, 8, 3))] + [
        l for l in tiny_cnn().layers if not isinstance(l, keras.layers.Dropout)])
    model = tf_stdprune.prune_low_std(dense, pruning_schedule=schedule())
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    fit(model, 0)
    model.save(tmp_path / "pruned.keras")
    copy = keras.saving.load_model(tmp_path / "pruned.keras")
    for original, loaded in zip(model.weights, copy.weights):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(loaded))
    keras.utils.set_random_seed(1)
    fit(model, 1)
    keras.utils.set_random_seed(1)
    fit(copy, 1)
    for original, loaded in zip(model.weights, copy.weights):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(loaded))
    assert isinstance(wrappers(copy)[0].pruning_schedule, tf_stdprune.StdPruningSchedule)


def test_strip_pruning_gives_the_same_outputs_with_exact_zeros_and_the_same_report(tiny_data):
    x, y = tiny_data
    model = tf_stdprune.prune_low_std(tiny_cnn(), pruning_schedule=schedule([0.8]))
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    stripped = tf_stdprune.strip_pruning(model)
    assert not wrappers(stripped)
    np.testing.assert_allclose(np.asarray(stripped.predict(x, verbose=0)),
                               np.asarray(model.predict(x, verbose=0)), rtol=1e-6, atol=1e-6)
    wrapped_report = tf_stdprune.sparsity_report(model)
    stripped_report = tf_stdprune.sparsity_report(stripped)
    assert wrapped_report == stripped_report
    kernel = np.asarray(stripped.get_layer("dense").kernel)
    assert wrapped_report.zero_weights >= np.count_nonzero(kernel == 0) > 0
    assert wrapped_report.total_weights == 3 * 3 * 3 * 4 + 4 + 64 * 3


def test_unknown_layers_subclassed_models_and_mixed_objects_get_clear_errors():
    class Custom(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 4))

        def call(self, x):
            return keras.ops.matmul(x, self.w)

    model = keras.Sequential([keras.Input((3,)), Custom(name="mine"), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"'mine'.*skip=\['mine'\]"):
        tf_stdprune.prune_low_std(model)
    pruned = tf_stdprune.prune_low_std(model, skip=["mine"])
    assert [type(l).__name__ for l in pruned.layers] == ["Custom", "PruneLowStd"]

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.ones((1, 3), "float32"))
    # Pruned on a copy made from its config: an unregistered class cannot be copied.
    with pytest.raises(ValueError, match="prunes a copy of.*register_keras_serializable"):
        tf_stdprune.prune_low_std(model)
    with pytest.raises(TypeError, match="takes a Keras layer or model"):
        tf_stdprune.prune_low_std(np.ones(3))


def test_mixing_tf_keras_and_keras3_objects_in_one_call_is_refused():
    tf_keras = pytest.importorskip("tf_keras")
    with pytest.raises(TypeError, match="mixes tf_keras and Keras 3"):
        tf_stdprune.prune_low_std([keras.layers.Dense(2), tf_keras.layers.Dense(2)])


def test_weight_sharing_trains_only_centroids_and_leaves_the_source_model_alone(tiny_data):
    """The optimizer sees centroids and biases, never the kernels that the shared values
    replace (so no slot is built for them and no missing-gradient warning is raised); the
    stripped source model keeps its variables, values and trainable flags."""
    x, y = tiny_data
    source = tiny_cnn()
    before = [(w.path, w.trainable, np.array(w)) for w in source.weights]
    quantized = tf_stdprune.quantize_weights(source, bits=3)
    trainable = {w.path.split("/")[-1] for w in quantized.trainable_variables}
    assert not {"kernel", "gamma"} & trainable
    assert {"kernel_centroids", "gamma_centroids", "bias"} <= trainable
    quantized.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantized.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for (path, was_trainable, value), weight in zip(before, source.weights):
        assert (weight.path, weight.trainable) == (path, was_trainable)
        np.testing.assert_array_equal(np.array(weight), value)


def test_deep_compression_pipeline_on_keras3(tmp_path, tiny_data):
    """prune -> strip -> quantize -> fine-tune centroids -> strip -> compress -> decompress,
    each reader leaving its input bit for bit, the file giving the same outputs."""
    x, y = tiny_data
    model = tf_stdprune.prune_low_std(tiny_cnn(), pruning_schedule=schedule([0.8]))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    quantized = tf_stdprune.quantize_weights(tf_stdprune.strip_pruning(model), bits=3)
    quantized.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    quantized.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = [np.array(w) for w in quantized.weights]
    final = tf_stdprune.strip_quantization(quantized)
    path = tf_stdprune.compress(quantized, tmp_path / "model.tfspz")
    for old, new in zip(before, quantized.weights):
        np.testing.assert_array_equal(old, np.asarray(new))
    kernel = np.asarray(final.get_layer("dense").kernel)
    assert len(np.unique(kernel[kernel != 0])) <= 2 ** 3
    assert np.count_nonzero(kernel == 0) > 0
    restored = tf_stdprune.decompress(path)
    assert type(restored).__module__.split(".")[0] == "keras"
    for a, b in zip(final.weights, restored.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(restored.predict(x, verbose=0)),
                               np.asarray(quantized.predict(x, verbose=0)), atol=1e-5)
    assert tf_stdprune.sparsity_report(restored) == tf_stdprune.sparsity_report(final)
    report = tf_stdprune.compression_report(quantized)
    assert report.to_dict()


def test_fit_of_a_model_with_nothing_pruned_follows_the_dense_models_fit(tiny_data):
    """With every mask 1 the wrapped model trains as the bare one: the same loss per epoch
    and the same weights, BN moving statistics and dropout seeds after ``fit`` (BN in
    training mode, Dropout active, L2 on the stored kernels)."""
    x, y = tiny_data
    dense = tiny_cnn(l2=1e-3)
    pruned = tf_stdprune.prune_low_std(dense, pruning_schedule=schedule((0.0,)))
    start = [np.array(v) for v in dense.variables]
    runs = []
    for model, callbacks in ((dense, []), (pruned, [tf_stdprune.UpdatePruningStep()])):
        for variable, value in zip(dense.variables, start):
            variable.assign(value)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                            callbacks=callbacks)
        runs.append((history.history["loss"], [np.array(v) for v in dense.variables]))
    (dense_loss, dense_values), (pruned_loss, pruned_values) = runs
    assert all(np.all(np.asarray(m) == 1.0) for w in wrappers(pruned) for m in w.masks)
    np.testing.assert_allclose(pruned_loss, dense_loss, rtol=1e-5)
    for variable, got, expected in zip(dense.variables, pruned_values, dense_values):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=variable.path)
    paths = [v.path for v in dense.variables]
    moving_mean = pruned_values[paths.index(dense.get_layer("bn").moving_mean.path)]
    assert not np.allclose(moving_mean, 0.0)  # the statistics moved: BN trained as in training
