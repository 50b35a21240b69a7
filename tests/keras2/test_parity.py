"""prune_low_std against tfmot's prune_low_magnitude: same layers, same steps, same errors.

Each test builds the same tiny model for both wrappers and compares them, with the std rule
checked against the float64 numpy reference (`reference.reference_step`).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.engine import PruneLowMagnitude, keras, tfmot
from tf_stdprune.keras2.wrapper import optimizer_slots

from reference import reference_pooled, reference_step

L = keras.layers
TFMOT = tfmot.sparsity.keras


def _sequence_model(layer, shape=(4, 2)):
    inputs = keras.Input(shape)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(layer(inputs))))


def _attention_model():
    inputs = keras.Input((4, 5))
    attended = L.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(attended)))


# name -> (model builder, input shape, integer inputs, whether tfmot prunes the layer)
NEW_LAYERS = {
    "Embedding": (lambda: _sequence_model(L.Embedding(10, 3, name="layer"), (4,)), (4,), True, True),
    "SimpleRNN": (lambda: _sequence_model(L.SimpleRNN(3, name="layer")), (4, 2), False, True),
    "LSTM": (lambda: _sequence_model(L.LSTM(3, name="layer")), (4, 2), False, True),
    "GRU": (lambda: _sequence_model(L.GRU(3, name="layer")), (4, 2), False, True),
    "StackedRNN": (lambda: _sequence_model(L.RNN([L.LSTMCell(2), L.GRUCell(3)], name="layer")),
                   (4, 2), False, True),
    "MultiHeadAttention": (_attention_model, (4, 5), False, True),
    "LocallyConnected1D": (lambda: _sequence_model(L.LocallyConnected1D(2, 3, name="layer"), (6, 2)),
                           (6, 2), False, True),
    "LocallyConnected2D": (lambda: _sequence_model(L.LocallyConnected2D(2, 3, name="layer"),
                                                   (5, 5, 1)), (5, 5, 1), False, True),
    "EinsumDense": (lambda: _sequence_model(L.EinsumDense("abc,cd->abd", (4, 3), name="layer")),
                    (4, 2), False, False),
    "Conv1DTranspose": (lambda: _sequence_model(L.Conv1DTranspose(2, 3, name="layer")),
                        (4, 2), False, False),
}


def _inputs(shape, integer, n=8):
    rng = np.random.default_rng(1)
    if integer:
        return rng.integers(0, 10, size=(n, *shape)).astype("int32")
    return rng.normal(size=(n, *shape)).astype("float32")


def _fit(model, x, steps):
    y = np.random.default_rng(2).normal(size=(len(x), 2)).astype("float32")
    model.fit(x, y, batch_size=len(x) // steps, epochs=1, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])


def _target(model):
    """The wrapper of the layer under test (the first PruneLowStd that is not the head)."""
    return next(l for l in model.layers if isinstance(l, tf_stdprune.PruneLowStd)
                and not isinstance(l.layer, L.Dense))


@pytest.mark.parametrize("name", sorted(NEW_LAYERS))
def test_each_newly_supported_layer_is_pruned_by_the_std_rule_and_stays_exactly_sparse(name):
    build, shape, integer, tfmot_prunes = NEW_LAYERS[name]
    original = build()
    # Weights of their own: the initializers' draws depend on what ran before in the process,
    # and a tensor of a few weights may then have none below 0.8 sigma.
    rng = np.random.default_rng(0)
    original.set_weights([rng.uniform(-1, 1, w.shape).astype(w.dtype)
                          for w in original.get_weights()])
    pruned = tf_stdprune.prune_low_std(
        original, tf_stdprune.StdPruningSchedule([0.8], steps_per_iteration=1000))
    wrapper = _target(pruned)
    weights = wrapper.layer.get_prunable_weights()
    if tfmot_prunes:  # tfmot's wrapper prunes the same tensors of the same layer
        theirs = TFMOT.prune_low_magnitude(build())
        their_layer = next(l for l in theirs.layers if isinstance(l, PruneLowMagnitude)
                           and not isinstance(l.layer, L.Dense))
        assert [w.shape for w in their_layer.layer.get_prunable_weights()] == [
            w.shape for w in weights]
    before = [w.numpy() for w in weights]
    pruned.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", run_eagerly=True)  # no tracing
    x = _inputs(shape, integer)
    _fit(pruned, x, steps=2)  # the first call prunes, then two updates
    for (weight, mask, _), w0 in zip(wrapper.pruning_vars, before):
        expected, _ = reference_step(w0, np.ones_like(w0, bool), 0.8, "initial")
        np.testing.assert_array_equal(mask.numpy().astype(bool), expected, err_msg=weight.name)
        assert 0 < (~expected).sum() < expected.size
        assert np.all(weight.numpy()[~expected] == 0.0)
        for slot in optimizer_slots(pruned.optimizer, weight):
            assert np.all(slot.numpy()[~expected] == 0.0), slot.name
    _fit(pruned, x, steps=2)  # masked gradients: pruned entries stay exactly 0
    for weight, mask, _ in wrapper.pruning_vars:
        assert np.all(weight.numpy()[mask.numpy() == 0] == 0.0)
    dense = keras.models.clone_model(original)
    dense.set_weights(tf_stdprune.strip_pruning(pruned).get_weights())
    np.testing.assert_allclose(pruned.predict(x, verbose=0), dense.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_rnn_and_attention_round_trip_through_h5_keras_and_saved_model(tmp_path):
    inputs = keras.Input((4, 5))
    hidden = L.LSTM(3, return_sequences=True, name="lstm")(inputs)
    hidden = L.MultiHeadAttention(2, 2, name="mha")(hidden, hidden)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(hidden)))
    pruned = tf_stdprune.prune_low_std(model, tf_stdprune.StdPruningSchedule([0.7], 3))
    pruned.compile(keras.optimizers.SGD(0.1), "mse")
    x = _inputs((4, 5), False)
    _fit(pruned, x, steps=4)  # prunes at calls 1 and 4
    expected = pruned.predict(x, verbose=0)
    stripped = tf_stdprune.strip_pruning(pruned)
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), expected)
    assert not any(isinstance(l, tf_stdprune.PruneLowStd) for l in stripped.layers)
    pruned.save(tmp_path / "m.h5")
    copies = [keras.models.load_model(tmp_path / "m.h5")]  # no prune_scope needed for .h5
    for name in ("m.keras", "saved"):
        pruned.save(tmp_path / name)
        with tf_stdprune.prune_scope():
            copies.append(keras.models.load_model(tmp_path / name))
    stripped.save(tmp_path / "s.keras")
    copies.append(keras.models.load_model(tmp_path / "s.keras"))
    for copy in copies:
        np.testing.assert_array_equal(copy.predict(x, verbose=0), expected)


@pytest.mark.parametrize("make", [
    lambda begin, f: TFMOT.ConstantSparsity(0.5, begin, frequency=f),
    lambda begin, f: TFMOT.PolynomialDecay(0.2, 0.8, begin, begin + 5 * f, frequency=f),
])
@pytest.mark.parametrize("begin, frequency", [(0, 3), (2, 2)])
def test_a_tfmot_schedule_prunes_at_the_same_steps_and_to_the_same_sparsity_as_tfmot(
        make, begin, frequency):
    def build():
        keras.utils.set_random_seed(3)
        return keras.Sequential([L.Dense(8, input_shape=(6,)), L.Dense(2)])

    theirs = TFMOT.prune_low_magnitude(build(), pruning_schedule=make(begin, frequency))
    ours = tf_stdprune.prune_low_std(build(), pruning_schedule=make(begin, frequency))
    x = _inputs((6,), False, n=1)
    zeros = {}
    for model, callback in ((theirs, TFMOT.UpdatePruningStep()),
                            (ours, tf_stdprune.UpdatePruningStep())):
        model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: the same weights in both
        counts = []
        for _ in range(12):
            model.fit(x, np.zeros((1, 2)), verbose=0, callbacks=[callback])
            counts.append(int((model.layers[0].pruning_vars[0][1].numpy() == 0).sum()))
        zeros[type(model.layers[0]).__name__] = counts
    assert zeros["PruneLowStd"] == zeros["PruneLowMagnitude"]
    assert len(set(zeros["PruneLowStd"])) > 1  # something was pruned


def test_constant_sparsity_is_honoured_as_target_sparsity_not_read_as_q():
    dense = L.Dense(20, input_shape=(10,))
    model = tf_stdprune.prune_low_std(keras.Sequential([dense]), TFMOT.ConstantSparsity(0.9, 0, frequency=1))
    model.compile("sgd", "mse")
    model.fit(np.ones((1, 10)), np.zeros((1, 20)), verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    assert np.mean(dense.kernel.numpy() == 0.0) == 0.9


def _xnnpack_model():
    inputs = keras.Input((8, 8, 3))
    hidden = L.Conv2D(4, 3, strides=2, padding="valid")(L.ZeroPadding2D(1)(inputs))
    hidden = L.ReLU()(L.Conv2D(4, 1)(L.ReLU()(hidden)))
    return keras.Model(inputs, L.GlobalAveragePooling2D()(hidden))


def test_pruning_policy_wraps_the_same_layers_as_tfmot():
    policy = TFMOT.PruneForLatencyOnXNNPack()
    theirs = TFMOT.prune_low_magnitude(_xnnpack_model(), pruning_policy=policy)
    ours = tf_stdprune.prune_low_std(_xnnpack_model(), pruning_policy=policy)
    wrapped = [[type(l.layer).__name__ + str(l.layer.kernel_size) for l in m.layers
                if isinstance(l, PruneLowMagnitude)] for m in (theirs, ours)]
    assert wrapped[0] == wrapped[1] == ["Conv2D(1, 1)"]
    with pytest.raises(ValueError, match="Conv2D 3x3"):  # tfmot's own model check
        tf_stdprune.prune_low_std(keras.Sequential([L.Dense(2, input_shape=(3,))]),
                                  pruning_policy=policy)


@pytest.mark.parametrize("block, pooling", [((2, 3), "AVG"), ((3, 2), "MAX"), ((1, 4), "AVG")])
def test_block_sparsity_keeps_blocks_whose_pooled_magnitude_reaches_q_sigma(block, pooling):
    dense = L.Dense(7, input_shape=(8,))
    wrapper = tf_stdprune.prune_low_std(dense, block_size=block, block_pooling_type=pooling)
    keras.Sequential([wrapper])
    kernel = dense.kernel.numpy()
    pooled = reference_pooled(kernel, block, pooling)
    middle = np.sort(pooled, axis=None)[pooled.size // 2 - 1: pooled.size // 2 + 1].mean()
    q = float(middle / np.std(pooled))  # half the blocks fall below q * sigma, none near it
    wrapper.pruning_obj.update_masks(q)
    keep = pooled >= q * np.std(pooled)
    expected = np.kron(keep, np.ones(block, bool))[:kernel.shape[0], :kernel.shape[1]]
    assert 0 < keep.sum() < keep.size
    np.testing.assert_array_equal(wrapper.pruning_vars[0][1].numpy().astype(bool), expected)
    np.testing.assert_array_equal(dense.kernel.numpy(), np.where(expected, kernel, 0.0))


def test_block_sparsity_refuses_kernels_that_are_not_2d_like_tfmot():
    with pytest.raises(ValueError, match="2-D"):
        keras.Sequential([tf_stdprune.prune_low_std(L.Conv2D(2, 3, input_shape=(5, 5, 1)),
                                                     block_size=(2, 2))])


def test_sparsity_m_by_n_at_q_0_chooses_the_same_weights_as_tfmot():
    """With q = 0 only the N:M step prunes: the masks equal tfmot's m_by_n masks."""
    def build():
        return keras.Sequential([L.Conv2D(6, 3, input_shape=(5, 5, 8), name="c"), L.Flatten(),
                                 L.Dense(5, name="d")])

    ours_model, theirs_model = build(), build()
    theirs_model.set_weights(ours_model.get_weights())
    ours = tf_stdprune.prune_low_std(ours_model, sparsity_m_by_n=(2, 4),
                                     pruning_schedule=tf_stdprune.StdPruningSchedule([0.0], 1))
    theirs = TFMOT.prune_low_magnitude(theirs_model, sparsity_m_by_n=(2, 4))
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 8)).astype(np.float32)
    for model, callback in ((ours, tf_stdprune.UpdatePruningStep()), (theirs, TFMOT.UpdatePruningStep())):
        model.compile(keras.optimizers.SGD(0.0), "mse")
        model.fit(x, np.zeros((2, 5)), epochs=1, verbose=0, callbacks=[callback])
    masks = [[l.pruning_vars[0][1].numpy() for l in m.layers
              if isinstance(l, PruneLowMagnitude) and l.pruning_vars] for m in (ours, theirs)]
    assert len(masks[0]) == len(masks[1]) == 2
    for mine, tfmots in zip(*masks):
        np.testing.assert_array_equal(mine, tfmots)
    assert tf_stdprune.check_m_by_n_sparsity(ours, 2, 4)
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

    assert all(pruning_utils.is_pruned_m_by_n(l.layer.kernel) for l in ours.layers[::2])


def test_unknown_keywords_raise_type_error_naming_them_for_models_and_layers():
    model = keras.Sequential([L.Dense(2, input_shape=(4,))])
    for bad in (dict(no_such_argument=1), dict(std_mod="all"), dict(layer_qualty={})):
        with pytest.raises(TypeError, match=list(bad)[0]):
            tf_stdprune.prune_low_std(model, **bad)
        with pytest.raises(TypeError, match=list(bad)[0]):
            tf_stdprune.prune_low_std(L.Dense(2), **bad)
        with pytest.raises(TypeError, match=list(bad)[0]):
            TFMOT.prune_low_magnitude(L.Dense(2), **bad)  # tfmot raises for a layer too
    # tfmot's own defaults are accepted for a layer as for a model
    for target in (L.Dense(2), model):
        tf_stdprune.prune_low_std(target, block_size=(1, 1), block_pooling_type="AVG",
                                  sparsity_m_by_n=None)


def test_conv_lstm_is_refused_like_tfmot():
    def model():
        return keras.Sequential([L.ConvLSTM2D(2, 3, input_shape=(3, 5, 5, 1), name="clstm")])

    with pytest.raises(ValueError):
        TFMOT.prune_low_magnitude(model())
    with pytest.raises(ValueError, match="ConvLSTM2D.*skip="):
        tf_stdprune.prune_low_std(model())
    original = model()
    assert tf_stdprune.prune_low_std(original, skip=["clstm"]) is original  # nothing to prune


class _Block(L.Layer):
    """A custom layer holding a Dense layer: kernels the registry does not know."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = L.Dense(3)

    def call(self, inputs):
        return self.inner(inputs)


def test_a_layer_with_unknown_kernels_raises_naming_it_unless_skipped():
    def model():
        inputs = keras.Input((4,))
        return keras.Model(inputs, L.Dense(2, name="head")(_Block(name="custom")(inputs)))

    with pytest.raises(ValueError, match="'custom'.*get_prunable_weights.*skip=\\['custom'\\]"):
        tf_stdprune.prune_low_std(model())
    pruned = tf_stdprune.prune_low_std(model(), skip=["custom"])
    assert [l.name for l in pruned.layers if isinstance(l, tf_stdprune.PruneLowStd)] == [
        "prune_low_std_head"]
    with pytest.raises(ValueError, match="skip.*'nope'"):
        tf_stdprune.prune_low_std(model(), skip=["nope"])


def test_get_prunable_weights_of_built_in_layers_lists_the_pruned_tensors():
    model = tf_stdprune.prune_low_std(keras.Sequential([
        L.Conv2D(2, 3, input_shape=(5, 5, 1)), L.Flatten(), L.Dense(2)]))
    for wrapper in model.layers:
        if isinstance(wrapper, tf_stdprune.PruneLowStd):
            assert wrapper.layer.get_prunable_weights() == [w for w, _, _ in wrapper.pruning_vars]
    stripped = tf_stdprune.strip_pruning(model)
    again = tf_stdprune.prune_low_std(stripped)  # re-pruning a stripped model works
    assert sum(isinstance(l, tf_stdprune.PruneLowStd) for l in again.layers) == 2


def test_strip_pruning_strips_both_wrappers_in_nested_models():
    inner = keras.Sequential([L.Dense(4, input_shape=(3,), name="a"), L.Dense(4, name="b")],
                             name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.Dense(2, name="c")(inner(inputs)))
    pruned = tf_stdprune.prune_low_std(model)
    nested = pruned.get_layer("inner")
    mixed = keras.Sequential([TFMOT.prune_low_magnitude(L.Dense(3), input_shape=(3,)), nested])
    stripped = tf_stdprune.strip_pruning(mixed)
    layers = list(tf_stdprune.keras2.prune.all_layers(stripped))
    assert not any(isinstance(l, PruneLowMagnitude) for l in layers)
    assert {"a", "b", "c"} - {l.name for l in layers} == {"c"}  # the nested model's layers
    x = _inputs((3,), False)
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), mixed.predict(x, verbose=0))
    with pytest.raises(ValueError, match="tf_keras model"):
        tf_stdprune.strip_pruning(L.Dense(2))


def test_re_pruning_with_other_settings_raises_and_same_settings_keep_the_model():
    model = keras.Sequential([L.Dense(3, input_shape=(4,))])
    pruned = tf_stdprune.prune_low_std(model, std_mode="all")
    with pytest.raises(ValueError, match="already pruned.*std_mode.*strip_pruning"):
        tf_stdprune.prune_low_std(pruned, std_mode="surviving")
    with pytest.raises(ValueError, match="already pruned.*pruning_schedule"):
        tf_stdprune.prune_low_std(pruned, tf_stdprune.StdPruningSchedule([2.0], 5), std_mode="all")
    again = tf_stdprune.prune_low_std(pruned, std_mode="all")
    assert again.layers[0].get_config() == pruned.layers[0].get_config()


@pytest.mark.parametrize("arguments, error, match", [
    (dict(prune_batchnorm="no"), TypeError, "prune_batchnorm.*'no'"),
    (dict(prune_batchnorm=0), TypeError, "prune_batchnorm"),
    (dict(layer_quality=[("d", 2.0)]), TypeError, "layer_quality.*dict"),
    (dict(layer_quality={"d": "2"}), ValueError, "layer_quality"),
    (dict(layer_quality={"d": 1e39}), ValueError, "layer_quality"),
    (dict(skip="d"), TypeError, "skip"),
])
def test_wrong_argument_types_raise_naming_the_argument(arguments, error, match):
    with pytest.raises(error, match=match):
        tf_stdprune.prune_low_std(keras.Sequential([L.Dense(2, input_shape=(3,), name="d")]),
                                  **arguments)


def test_huge_q_never_prunes_a_zero_std_tensor_and_nan_q_is_refused():
    dense = L.Dense(4, input_shape=(3,), kernel_initializer="ones")
    wrapper = tf_stdprune.prune_low_std(dense)
    keras.Sequential([wrapper])
    wrapper.pruning_obj.update_masks(3e38)  # inf * 0 must not become a NaN threshold
    assert np.all(wrapper.pruning_vars[0][1].numpy() == 1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite q"):
        wrapper.pruning_obj.update_masks(float("nan"))
    assert np.all(wrapper.pruning_vars[0][1].numpy() == 1.0)


def test_std_schedule_prunes_at_the_first_call_of_each_iteration_in_tfmot_step_numbers():
    model = tf_stdprune.prune_low_std(keras.Sequential([L.Dense(3, input_shape=(4,))]),
                                      tf_stdprune.StdPruningSchedule([0.5, 1.0], 3, begin_step=2))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    wrapper, pruned_at = model.layers[0], []
    for _ in range(8):
        model.fit(np.ones((1, 4)), np.zeros((1, 3)), verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
        pruned_at.append(int(wrapper.pruned_at_step.numpy()))
    # begin_step=2 as in tfmot: calls (= steps) 2, 5, 8
    assert pruned_at == [-1, 2, 2, 2, 5, 5, 5, 8]
    assert int(wrapper.pruning_step.numpy()) == 8


def test_stop_and_restart_prunes_at_the_steps_of_tfmots_wrapper_and_keeps_sparsity():
    """tfmot's prune_low_magnitude with ConstantSparsity(begin_step=b, end_step=e, frequency=f)
    and ours with StdPruningSchedule(f, begin_step=b, end_step=e) update their thresholds at
    the same steps across two fits, and the second fit keeps the first's zeros."""
    begin, frequency, end = 3, 4, 15
    tfmot_model = tfmot.sparsity.keras.prune_low_magnitude(
        keras.Sequential([L.Dense(6, input_shape=(5,))]),
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin, end, frequency))
    ours = tf_stdprune.prune_low_std(
        keras.Sequential([L.Dense(6, input_shape=(5,))]),
        tf_stdprune.StdPruningSchedule([0.3, 0.6, 0.9, 1.2], frequency, begin_step=begin, end_step=end))
    steps = {"tfmot": [], "ours": []}

    class Thresholds(keras.callbacks.Callback):
        def __init__(self, key, threshold):
            super().__init__()
            self.key, self.threshold, self.last = key, threshold, 0.0

        def on_train_batch_end(self, batch, logs=None):
            value = float(self.threshold.numpy())
            if value != self.last:
                steps[self.key].append(int(self.model.optimizer.iterations.numpy()))
            self.last = value

    data = np.random.default_rng(0).normal(size=(20, 5)), np.random.default_rng(1).normal(size=(20, 6))
    zeros = {}
    for fit in range(2):  # stop after 10 steps, restart with a new fit and new callbacks
        for key, model in (("tfmot", tfmot_model), ("ours", ours)):
            if fit == 0:
                model.compile(keras.optimizers.SGD(0.05), "mse")
            step = (tfmot.sparsity.keras.UpdatePruningStep() if key == "tfmot"
                    else tf_stdprune.UpdatePruningStep())
            model.fit(*data, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[
                step, Thresholds(key, model.layers[0].pruning_vars[0][2])])
            kernel = model.layers[0].pruning_vars[0][0].numpy()
            if fit == 1:
                assert np.all(kernel[zeros[key]] == 0.0), key
            zeros[key] = kernel == 0.0
    assert steps["ours"] == steps["tfmot"] == [3, 7, 11, 15]
