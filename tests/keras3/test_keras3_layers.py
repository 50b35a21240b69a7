"""Every layer kind the registry names is pruned on Keras 3: the wrapped layer computes
with w * m (stored values at pruned positions are ignored), and training keeps them 0."""
import keras
import numpy as np
import pytest

import tf_stdprune
from tf_stdprune import registry
from tf_stdprune.keras3.prune import wrappers

L = keras.layers


def _seq(shape, *layers):
    """A factory of Input -> layers -> Flatten -> Dense(2); ``layers`` are (class, args)."""
    return lambda: keras.Sequential([keras.Input(shape)] + [
        cls(*args, **kwargs) for cls, *args, kwargs in layers] + [L.Flatten(), L.Dense(2)])


def _attention():
    inputs = keras.Input((5, 8))
    x = L.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))


def _nested():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5, name="inner_dense")], name="inner")
    inputs = keras.Input((6,))
    return keras.Model(inputs, L.Dense(2, name="outer")(inner(inputs)))


MODELS = {
    "dense": _seq((6,), (L.Dense, 5, {})),
    "einsum_dense": _seq((6,), (L.EinsumDense, "ab,bc->ac", {"output_shape": 5})),
    "conv1d": _seq((7, 3), (L.Conv1D, 4, 3, {})),
    "conv2d": _seq((6, 6, 3), (L.Conv2D, 4, 3, {})),
    "conv3d": _seq((4, 4, 4, 2), (L.Conv3D, 3, 2, {})),
    "conv1d_transpose": _seq((5, 3), (L.Conv1DTranspose, 4, 3, {})),
    "conv2d_transpose": _seq((4, 4, 3), (L.Conv2DTranspose, 4, 3, {})),
    "conv3d_transpose": _seq((3, 3, 3, 2), (L.Conv3DTranspose, 3, 2, {})),
    "depthwise_conv2d": _seq((6, 6, 3), (L.DepthwiseConv2D, 3, {"depth_multiplier": 2})),
    "separable_conv2d": _seq((6, 6, 3), (L.SeparableConv2D, 4, 3, {})),
    "embedding": lambda: keras.Sequential([keras.Input((4,), dtype="int32"),
                                           L.Embedding(10, 6), L.Flatten(), L.Dense(2)]),
    "batchnorm": _seq((6,), (L.Dense, 5, {}), (L.BatchNormalization, {})),
    "simple_rnn": _seq((5, 3), (L.SimpleRNN, 4, {})),
    "lstm": _seq((5, 3), (L.LSTM, 4, {})),
    "gru": _seq((5, 3), (L.GRU, 4, {})),
    "multi_head_attention": _attention,
    "nested": _nested,
}


def _inputs(model, rng):
    shape = (8,) + tuple(model.inputs[0].shape[1:])
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 10, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrapped_layer_computes_with_masked_weights_and_training_keeps_zeros(name):
    rng = np.random.default_rng(0)
    original = MODELS[name]()
    pruned = tf_stdprune.prune_low_std(original, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.7], steps_per_iteration=1000))
    layers = wrappers(pruned)
    expected_kinds = {registry.layer_kind(w.layer) for w in layers}
    assert len(layers) >= 2 and "other" not in expected_kinds
    for wrapper in layers:
        wrapper.update_masks(0.7)
    x = _inputs(pruned, rng)
    masked = [np.asarray(v) for w in layers for v in w.pruned_weights]
    # Garbage at pruned positions of the stored weights must not reach the output.
    for variable, mask in ((v, m) for w in layers for v, m in zip(w.pruned_weights, w.masks)):
        mask = np.asarray(mask)
        assert 0 < (mask == 0).sum() < mask.size or mask.size <= 6
        variable.assign(np.asarray(variable) + 5.0 * (1 - mask))
    got = keras.ops.convert_to_numpy(pruned(x))
    for variable, value in zip((v for w in layers for v in w.pruned_weights), masked):
        variable.assign(value)
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(original(x)), rtol=1e-5, atol=1e-5)

    pruned.compile(keras.optimizers.Adam(0.05), "mse")
    pruned.fit(x, rng.normal(size=(8, 2)).astype("float32"), epochs=2, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    for wrapper in layers:
        for variable, mask in zip(wrapper.pruned_weights, wrapper.masks):
            assert np.all(np.asarray(variable)[np.asarray(mask) == 0] == 0.0), wrapper.name


def _attention_with_dropout():
    inputs = keras.Input((5, 8))
    x = L.MultiHeadAttention(2, 4, dropout=0.5, name="mha")(inputs, inputs)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))


# Layers whose call depends on the training mode or on the input's mask.
MODE_MODELS = {
    "batchnorm": MODELS["batchnorm"],
    "lstm_with_dropout": _seq((5, 3), (L.LSTM, 4, {"dropout": 0.5, "recurrent_dropout": 0.5})),
    "masked_embedding_into_gru_with_dropout": lambda: keras.Sequential([
        keras.Input((6,), dtype="int32"), L.Embedding(10, 6, mask_zero=True),
        L.GRU(4, dropout=0.5), L.Dense(2)]),
    "multi_head_attention_with_dropout": _attention_with_dropout,
}


def _values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


@pytest.mark.parametrize("name", sorted(MODE_MODELS))
def test_a_wrapped_layer_in_training_mode_computes_and_updates_its_state_as_the_bare_layer(name):
    """``training=True`` and the input's mask reach the wrapped layer: with all masks 1 the
    pruned model's training-mode output, and every variable after the call (moving
    statistics, dropout seeds), equal those of the unwrapped model."""
    rng = np.random.default_rng(0)
    original = MODE_MODELS[name]()
    pruned = tf_stdprune.prune_low_std(original)
    x = _inputs(original, rng)
    if "masked" in name:
        x[:, 3:] = 0  # padding: the mask skips these steps
    start = _values(original.variables)
    expected = np.asarray(original(x, training=True))
    expected_state = _values(original.variables)
    assert any(not np.array_equal(a, b) for a, b in zip(start, expected_state))
    for variable, value in zip(original.variables, start):
        variable.assign(value)
    got = np.asarray(pruned(x, training=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for variable, value in zip(original.variables, expected_state):
        np.testing.assert_allclose(np.asarray(variable), value, rtol=1e-5, atol=1e-6,
                                   err_msg=variable.path)
    inference = np.asarray(pruned(x, training=False))
    np.testing.assert_allclose(inference, np.asarray(original(x)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(inference, got, atol=1e-4)  # the mode changes this model's output


def _batchnorm_layers(model):
    return [layer for layer in (getattr(l, "layer", l) for l in model.layers)
            if isinstance(layer, L.BatchNormalization)]


@pytest.mark.parametrize("name", ["batchnorm", "masked_embedding_into_gru"])
def test_a_quantized_layer_in_training_mode_computes_and_updates_its_state_as_the_plain_layer(
        name):
    """``training=True`` and the input's mask reach the layer inside `QuantizeWeights`: the
    quantized model and its stripped plain copy give the same outputs in training and in
    inference mode, and the same BN moving statistics after a training-mode call."""
    rng = np.random.default_rng(0)
    model = MODELS["batchnorm"]() if name == "batchnorm" else keras.Sequential([
        keras.Input((6,), dtype="int32"), L.Embedding(10, 6, mask_zero=True), L.GRU(4),
        L.Dense(2)])
    quantized = tf_stdprune.quantize_weights(model, bits=4)
    plain = tf_stdprune.strip_quantization(quantized)
    x = _inputs(model, rng)
    x[:, 3:] = 0  # for the Embedding: padding that the mask skips
    got, expected = (np.asarray(m(x, training=True)) for m in (quantized, plain))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_batchnorm_layers(quantized), _batchnorm_layers(plain)):
        np.testing.assert_allclose(np.asarray(ours.moving_mean), np.asarray(theirs.moving_mean),
                                   rtol=1e-5, atol=1e-7)
        assert not np.allclose(np.asarray(ours.moving_mean), 0.0)
    np.testing.assert_allclose(np.asarray(quantized(x)), np.asarray(plain(x)), rtol=1e-5,
                               atol=1e-6)
