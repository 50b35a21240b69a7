"""PruneLowStd: masked kernels AND masked gradients, optimizer slots, tfmot protocol."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    collect_prunable_layers,
)

import tf_stdprune
from tf_stdprune import mask_rule
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.wrapper import optimizer_slots

from conftest import tiny_cnn
from reference import reference_step

OPTIMIZERS = {
    "sgd_momentum_l2": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "legacy_sgd_momentum": lambda: keras.optimizers.legacy.SGD(0.05, momentum=0.9),
}
SLOTS_PER_WEIGHT = {"SGD": 1, "Adam": 2, "AdamW": 2}  # momentum; m and v
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _pruned(steps_per_iteration=4, qualities=(0.8, 1.0), **kwargs):
    return tf_stdprune.prune_low_std(
        tiny_cnn(l2=1e-3),
        pruning_schedule=tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration),
        **kwargs)


def _wrappers(model):
    return [l for l in model.layers if isinstance(l, tf_stdprune.PruneLowStd)]


def _kernel_state(model):
    return [(w.numpy().copy(), m.numpy().copy()) for l in _wrappers(model)
            for w, m, _ in l.pruning_vars]


def _assert_stored_zeros(wrappers):
    """Every stored pruned weight is exactly 0.0."""
    for layer in wrappers:
        for weight, mask, _ in layer.pruning_vars:
            assert np.all(weight.numpy()[mask.numpy() == 0] == 0), weight.name


def _assert_exactly_pruned(model, data, initial):
    """Pruned entries of kernel, gradient and every optimizer slot are exactly 0."""
    x, y = data
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=False)) + tf.add_n(model.losses)
    variables = [w for l in _wrappers(model) for w, _, _ in l.pruning_vars]
    gradients = dict(zip(map(id, variables), tape.gradient(loss, variables)))
    pruned_somewhere = 0
    for layer in _wrappers(model):
        for weight, mask, _ in layer.pruning_vars:
            pruned = mask.numpy() == 0
            pruned_somewhere += pruned.sum()
            assert np.all(weight.numpy()[pruned] == 0.0), weight.name
            gradient = gradients[id(weight)].numpy()
            assert np.all(gradient[pruned] == 0.0), weight.name
            assert np.any(gradient[~pruned] != 0.0)
            slots = optimizer_slots(model.optimizer, weight)
            assert len(slots) == SLOTS_PER_WEIGHT[type(model.optimizer).__name__], weight.name
            for slot in slots:
                assert np.all(slot.numpy()[pruned] == 0.0), slot.name
    assert pruned_somewhere > 0
    for (before, mask), (after, _) in zip(initial, _kernel_state(model)):
        if before.std() > 0:
            assert np.any(after[mask == 1] != before[mask == 1])  # survivors trained


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fit_masks_kernel_gradient_and_slots(name, tiny_data):
    model = _pruned()
    model.compile(OPTIMIZERS[name](), LOSS)
    initial = _kernel_state(model)
    x, y = tiny_data
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    assert int(_wrappers(model)[0].pruning_step.numpy()) == 16
    _assert_exactly_pruned(model, tiny_data, initial)


def test_xla_compiled_fit(tiny_data):
    model = _pruned()
    model.compile(OPTIMIZERS["adamw"](), LOSS, jit_compile=True)
    initial = _kernel_state(model)
    model.fit(*tiny_data, batch_size=8, epochs=2, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    _assert_exactly_pruned(model, tiny_data, initial)


def test_custom_gradient_tape_loop(tiny_data):
    """How to prune in a custom loop (tfmot's protocol, plus our slot masking):

    1. ``callback = tf_stdprune.UpdatePruningStep(); callback.set_model(model)``, with
       ``model.optimizer`` set to the optimizer the loop uses;
    2. ``callback.on_train_begin()`` once (sets ``pruning_step`` to 0);
    3. each step: forward with ``model(x, training=True)`` (advances ``pruning_step`` and
       prunes when the schedule fires), ``optimizer.apply_gradients(...)``, then
       ``callback.on_train_batch_end(batch)`` (zeroes slots and weights after a prune).
    """
    model = _pruned()
    optimizer = OPTIMIZERS["sgd_momentum_l2"]()
    model.optimizer = optimizer
    callback = tf_stdprune.UpdatePruningStep()
    callback.set_model(model)
    callback.on_train_begin()
    initial = _kernel_state(model)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True)) + tf.add_n(model.losses)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))

    x, y = tiny_data
    for batch in range(12):
        callback.on_train_batch_begin(batch)
        train_step(x[batch % 8 * 8:][:8], y[batch % 8 * 8:][:8])
        callback.on_train_batch_end(batch)
    callback.on_epoch_end(0)
    _assert_exactly_pruned(model, tiny_data, initial)


def _always_multiply(weight, mask, weights_masked):
    """The forward ``w * m`` by plain TF ops, ignoring ``weights_masked``: the reference."""
    kernel = tf.convert_to_tensor(weight)
    return kernel * tf.cast(mask, kernel.dtype)


def test_skipping_the_forward_product_changes_nothing(tiny_data, monkeypatch):
    """Bit for bit the same training as with a plain ``w * m`` at every step, including a
    prune in the middle of an execution (steps_per_execution=3, prunes at steps 0 and 4)."""
    histories, weights = [], []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(tf_stdprune.keras2.wrapper, "_masked", _always_multiply)
        keras.utils.set_random_seed(0)
        model = _pruned()
        model.compile(OPTIMIZERS["sgd_momentum_l2"](), LOSS, steps_per_execution=3)
        history = model.fit(*tiny_data, batch_size=8, epochs=3, shuffle=False, verbose=0,
                            callbacks=[tf_stdprune.UpdatePruningStep()])
        histories.append(history.history["loss"])
        weights.append(model.get_weights())
        assert all(l.weights_masked.numpy() for l in _wrappers(model))
    assert histories[0] == histories[1]
    for ours, reference in zip(*weights):
        np.testing.assert_array_equal(ours, reference)


def _masked_reference(model):
    """A plain copy of ``model`` whose kernels/gammas are ``w * m``: the masked model."""
    reference = tiny_cnn(l2=1e-3)
    values = []
    for layer in model.layers:
        masks = {id(w): m.numpy() for w, m, _ in getattr(layer, "pruning_vars", [])}
        inner = getattr(layer, "layer", layer)
        values += [v.numpy() * masks.get(id(v), 1.0) for v in inner.weights]
    reference.set_weights(values)
    return reference


def test_forward_multiplies_until_weights_and_slots_are_masked(tiny_data):
    """With tfmot's callback momentum moves pruned weights after a prune (it does not
    zero slots): the layer keeps computing ``w * m``. Ours masks weights and slots, and
    from then on the stored kernel is used as it is."""
    x, y = tiny_data
    model = _pruned()
    model.compile(OPTIMIZERS["sgd_momentum_l2"](), LOSS)
    tfmot_callback = tfmot.sparsity.keras.UpdatePruningStep()
    tfmot_callback.set_model(model)
    tfmot_callback.on_train_begin()
    for batch in range(6):  # prunes at steps 0 (momentum still 0) and 4
        tfmot_callback.on_train_batch_begin(batch)
        model.train_on_batch(x[batch * 8:][:8], y[batch * 8:][:8])
    wrappers = _wrappers(model)
    assert not any(l.weights_masked.numpy() for l in wrappers)
    moved = sum(np.count_nonzero(w.numpy()[m.numpy() == 0])
                for l in wrappers for w, m, _ in l.pruning_vars)
    assert moved > 0
    np.testing.assert_allclose(model(x), _masked_reference(model)(x), rtol=1e-5, atol=1e-6)

    ours = tf_stdprune.UpdatePruningStep()
    ours.set_model(model)
    ours.on_train_begin()
    assert all(l.weights_masked.numpy() for l in wrappers)
    _assert_stored_zeros(wrappers)
    expected = _masked_reference(model)(x)
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)

    # The contract: assigning a kernel directly needs weight_mask_op() afterwards.
    dense = wrappers[-1].layer
    dense.kernel.assign(tf.ones_like(dense.kernel))
    assert not np.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    wrappers[-1].pruning_obj.weight_mask_op()
    assert not np.allclose(model(x), expected, rtol=1e-5, atol=1e-6)  # new survivors = 1
    np.testing.assert_allclose(model(x), _masked_reference(model)(x), rtol=1e-5, atol=1e-6)


def test_training_path_prunes_by_reference_rule(tiny_data):
    """Inside train_on_batch each pruning step's mask is the numpy rule applied to the
    weights just before it, with the iteration's q and the sigma stored at the first
    step (default mode "initial"; every mode is compared in test_mask_rule)."""
    qualities = [0.5, 0.9, 1.2]
    model = _pruned(steps_per_iteration=1, qualities=qualities)
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    layer = _wrappers(model)[0]
    assert layer.std_mode == "initial"
    weight, mask, threshold = layer.pruning_vars[0]
    step = tf_stdprune.UpdatePruningStep()
    step.set_model(model)
    step.on_train_begin()
    initial_sigma = None
    for q in qualities:
        before_w, before_m = weight.numpy().copy(), mask.numpy().astype(bool)
        expected, sigma = reference_step(before_w, before_m, q, "initial", initial_sigma)
        initial_sigma = sigma if initial_sigma is None else initial_sigma
        model.train_on_batch(tiny_data[0][:8], tiny_data[1][:8])
        np.testing.assert_array_equal(mask.numpy().astype(bool), expected)
        np.testing.assert_allclose(threshold.numpy(), q * initial_sigma, rtol=1e-5)
        assert np.all(mask.numpy() <= before_m)


def test_layer_quality_scales_threshold():
    models = []
    for factor in (1.0, 2.0):
        base = tiny_cnn()
        models.append(tf_stdprune.prune_low_std(base, layer_quality={base.layers[-1].name: factor}))
    models[1].set_weights(models[0].get_weights())
    for model in models:
        for layer in _wrappers(model):
            layer.pruning_obj.update_masks(0.7)
    plain, scaled = (_wrappers(m)[-1].pruning_vars[0][2].numpy() for m in models)
    assert plain > 0 and scaled == 2.0 * plain  # (2 q) sigma, same sigma: exactly twice
    assert _wrappers(models[1])[0].pruning_vars[0][2].numpy() == (
        _wrappers(models[0])[0].pruning_vars[0][2].numpy())


def test_only_kernels_and_batchnorm_gamma_are_pruned():
    rng = np.random.default_rng(0)
    bn, dense = keras.layers.BatchNormalization(), keras.layers.Dense(4)
    wrappers = [tf_stdprune.PruneLowStd(bn), tf_stdprune.PruneLowStd(dense)]
    wrappers[0].build((None, 6))
    wrappers[1].build((None, 5))
    assert [w.name for l in wrappers for w, _, _ in l.pruning_vars] == [bn.gamma.name,
                                                                        dense.kernel.name]
    others = [bn.beta, bn.moving_mean, bn.moving_variance, dense.bias]
    for variable in [bn.gamma, dense.kernel] + others:
        sign = rng.choice([-1, 1], variable.shape)
        variable.assign(rng.uniform(0.01, 1.0, variable.shape) * sign)
    before = [v.numpy() for v in others]
    for wrapper in wrappers:
        wrapper.pruning_obj.update_masks(1e6)  # prunes every pruned tensor completely
    assert np.all(bn.gamma.numpy() == 0) and np.all(dense.kernel.numpy() == 0)
    for variable, value in zip(others, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.name)
    assert tf_stdprune.prune_low_std([bn], prune_batchnorm=False) == [bn]
    no_scale = keras.layers.BatchNormalization(scale=False)
    assert tf_stdprune.prune_low_std([no_scale]) == [no_scale]


def test_tfmot_callbacks_and_helpers_work_unchanged(tiny_data, tmp_path):
    model = _pruned()
    model.compile(OPTIMIZERS["sgd_momentum_l2"](), LOSS)
    model.fit(*tiny_data, batch_size=8, epochs=1, verbose=0, callbacks=[
        tfmot.sparsity.keras.UpdatePruningStep(),
        tfmot.sparsity.keras.PruningSummaries(log_dir=str(tmp_path))])
    layers = collect_prunable_layers(model)
    assert layers == _wrappers(model)
    _assert_stored_zeros(layers)  # tfmot's callback re-masks at epoch end
    assert (1 - _wrappers(model)[0].pruning_vars[0][1].numpy().mean()) > 0.2
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_missing_callback_raises_clear_error(tiny_data):
    model = _pruned()
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    with pytest.raises(tf.errors.InvalidArgumentError, match="UpdatePruningStep"):
        model.fit(*tiny_data, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("bad, error, match", [
    (lambda: tf_stdprune.PruneLowStd(tiny_cnn()), TypeError, "prune_low_std"),
    (lambda: tf_stdprune.PruneLowStd(tf_stdprune.PruneLowStd(keras.layers.Dense(2))),
     ValueError, "already wrapped"),
    (lambda: tf_stdprune.PruneLowStd("dense"), TypeError, "tf_keras layer.*Dense"),
    (lambda: tf_stdprune.PruneLowStd(keras.layers.ReLU()), ValueError, "no prunable"),
    (lambda: tf_stdprune.PruneLowStd(keras.layers.Dense(2), std_mode="median"), ValueError,
     "std_mode"),
    (lambda: tf_stdprune.PruneLowStd(keras.layers.Dense(2), layer_quality=-1), ValueError,
     "layer_quality"),
    (lambda: tf_stdprune.PruneLowStd(keras.layers.Dense(2), pruning_schedule=0.5), TypeError,
     "pruning_schedule"),
])
def test_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        bad()


def test_keras3_objects_go_to_the_keras3_path_and_the_tf_keras_wrapper_refuses_them():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip("Keras 3 not installed")
    from tf_stdprune.keras3 import wrapper as keras3_wrapper

    assert isinstance(tf_stdprune.prune_low_std(keras3.layers.Dense(2)), keras3_wrapper.PruneLowStd)
    for obj in (keras3.layers.Dense(2), keras3.Sequential([keras3.layers.Dense(2)])):
        with pytest.raises(TypeError, match="Keras 3 object"):
            tf_stdprune.PruneLowStd(obj)


def test_zero_std_and_nan_weights():
    dense = keras.layers.Dense(3)
    wrapped = tf_stdprune.PruneLowStd(dense, std_mode="surviving")
    wrapped.build((None, 4))
    dense.kernel.assign(tf.fill([4, 3], 0.25))
    wrapped.pruning_obj.update_masks(2.0)
    assert np.all(wrapped.pruning_vars[0][1].numpy() == 1.0)  # sigma = 0: nothing pruned
    kernel = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    kernel[0, 0] = np.nan
    dense.kernel.assign(kernel)
    with pytest.raises(tf_stdprune.NonFiniteError, match=r"kernel: 1 of 12 values"):
        wrapped.pruning_obj.update_masks(0.5)  # the rule would prune the NaN: refused
    _, mask, threshold = wrapped.pruning_vars[0]
    assert np.all(mask.numpy() == 1.0) and np.isnan(dense.kernel.numpy()[0, 0])


def test_no_retracing_across_iterations_and_qualities(tiny_data):
    model = _pruned(steps_per_iteration=2, qualities=(0.5, 0.8, 1.1))
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    fit = lambda: model.fit(*tiny_data, batch_size=16, epochs=1, verbose=0,  # noqa: E731
                            callbacks=[tf_stdprune.UpdatePruningStep()])
    fit()
    layer = _wrappers(model)[0]
    layer.pruning_obj.update_masks(0.3)
    counts = (model.train_function.experimental_get_tracing_count(),
              mask_rule.compiled_std_rule.experimental_get_tracing_count())
    fit()  # prunes again, with new q values
    for q in (0.9, 1.3, 2):
        layer.pruning_obj.update_masks(q)
    assert (model.train_function.experimental_get_tracing_count(),
            mask_rule.compiled_std_rule.experimental_get_tracing_count()) == counts


def test_inner_layer_gets_its_variables_back(tiny_data):
    """The masked kernel is swapped in only during call(), also when the call fails."""
    model = _pruned()
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    model.fit(*tiny_data, batch_size=32, epochs=1, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    with pytest.raises(Exception):
        model.layers[0](tf.zeros([1, 8, 8, 5]))  # wrong channel count
    for layer in _wrappers(model):
        for attribute, (weight, _, _) in zip(layer._weight_attributes, layer.pruning_vars):
            assert getattr(layer.layer, attribute) is weight
            assert any(w is weight for w in layer.trainable_weights)
    assert len(model.trainable_weights) == 6  # conv k, b; BN gamma, beta; dense k, b


def test_mixed_precision_rule_uses_float32_weights(tiny_data):
    """With mixed_float16 the layer computes in float16, the rule on the float32 weights.

    sigma is brought to T = 0.75 (a float16 number) and every 7th entry set to
    +-T (1 +- 2e-4): in float16 they all round to exactly T, so a rule fed float16
    weights would decide half of them against the float32 reference.
    """
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tf_stdprune.prune_low_std(
            keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 3)),
                              keras.layers.Dense(20, name="d")]),
            pruning_schedule=tf_stdprune.StdPruningSchedule([1.0], 100))
        model.compile(keras.optimizers.SGD(0.0), LOSS)
        layer = _wrappers(model)[0]
        assert layer.compute_dtype == "float16"
        kernel = np.random.default_rng(2).normal(size=(192, 20)).astype(np.float32)
        near = np.arange(0, kernel.size, 7)
        sign = np.where(np.arange(near.size) % 2, 1.0, -1.0)
        for _ in range(4):  # converges: sigma = T within 2e-5
            kernel = (kernel * (0.75 / kernel.astype(np.float64).std())).astype(np.float32)
            kernel.flat[near] = 0.75 * (1 + 2e-4 * sign) * np.sign(kernel.flat[near])
        layer.layer.kernel.assign(kernel)
        model.fit(*tiny_data, batch_size=64, epochs=1, verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _, mask, _ = layer.pruning_vars[0]
    expected = np.abs(kernel.astype(np.float64)) >= kernel.astype(np.float64).std()
    assert np.all(np.float16(kernel.flat[near]) == 0.75 * np.sign(kernel.flat[near]))
    np.testing.assert_array_equal(mask.numpy().astype(bool), expected)
