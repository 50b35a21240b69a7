"""prune_low_std: which layers get wrapped, weights kept, errors, mixing with tfmot."""
from absl import logging
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.prune import all_layers
from tf_stdprune.keras2.wrapper import optimizer_slots

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sequential():
    return keras.Sequential([
        L.Conv2D(4, 3, padding="same", use_bias=False, input_shape=(8, 8, 3), name="c1"),
        L.BatchNormalization(name="bn1"), L.ReLU(name="r1"), L.MaxPooling2D(name="p1"),
        L.Dropout(0.1, name="drop"), L.Flatten(name="f"), L.Dense(3, name="d1")])


def residual():
    inputs = keras.Input((8, 8, 3), name="x")
    stem = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", name="c1")(stem))
    y = L.Conv2D(4, 1, use_bias=False, name="c2")(L.ReLU(name="r")(y))
    x = L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([stem, y]))
    return keras.Model(inputs, L.Dense(3, name="d")(x))


def nested():
    inner = keras.Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 3), name="inner_c"),
                              L.BatchNormalization(name="inner_bn"), L.Flatten(name="inner_f")],
                             name="inner")
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, L.Dense(3, name="outer_d")(inner(inputs)))


def shared():
    inputs = keras.Input((8, 8, 3))
    stem = L.Conv2D(3, 1, name="stem")(inputs)
    conv = L.Conv2D(4, 3, padding="same", name="shared_c")
    a = conv(stem)
    b = conv(L.Lambda(lambda t: t[:, ::-1], name="flip")(stem))
    x = L.Flatten(name="f")(L.Concatenate(name="cat")([a, b]))
    return keras.Model(inputs, L.Dense(3, name="d")(x))


def conv_kinds():
    return keras.Sequential([
        L.DepthwiseConv2D(3, input_shape=(8, 8, 3), name="dw"), L.SeparableConv2D(4, 3, name="sep"),
        L.Conv2DTranspose(4, 3, name="tr"), L.Reshape((3, 4, 3, 4), name="rs3"),
        L.Conv3D(2, 2, use_bias=False, name="c3"), L.Reshape((12, 2), name="rs1"),
        L.Conv1D(3, 3, name="c1"), L.Flatten(name="f"),
        L.Dense(3, use_bias=False, name="d")])


# name -> (model builder, names of the layers that must be wrapped: independent of the code)
MODELS = {
    "sequential": (sequential, {"c1", "bn1", "d1"}),
    "residual": (residual, {"stem", "c1", "bn", "c2", "d"}),
    "nested": (nested, {"inner_c", "inner_bn", "outer_d"}),
    "shared": (shared, {"stem", "shared_c", "d"}),
    "conv_kinds": (conv_kinds, {"dw", "sep", "tr", "c3", "c1", "d"}),
}
PRUNED_TENSORS = {"sep": ["depthwise_kernel", "pointwise_kernel"], "dw": ["depthwise_kernel"],
                  "bn1": ["gamma"], "bn": ["gamma"], "inner_bn": ["gamma"]}


def _wrappers(model):
    return [l for l in all_layers(model) if isinstance(l, tf_stdprune.PruneLowStd)]


def _pretrained(builder, x):
    model = builder()
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0.5, 0.5, w.shape).astype("float32") ** 2
                       if "variance" in w.name else rng.normal(0, 0.5, w.shape).astype("float32")
                       for w in model.weights])
    return model, model(x, training=False).numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_right_layers_wrapped_and_pretrained_outputs_kept(name, tiny_data):
    builder, expected = MODELS[name]
    x = tiny_data[0][:16]
    model, outputs = _pretrained(builder, x)
    pruned = tf_stdprune.prune_low_std(model)
    assert type(pruned) is type(model)
    wrappers = _wrappers(pruned)
    assert sorted(w.layer.name for w in wrappers) == sorted(expected)
    unwrapped = {l.name for l in all_layers(model) if not isinstance(l, keras.Model)} - expected
    assert unwrapped <= {l.name for l in all_layers(pruned)}
    for wrapper in wrappers:
        attributes = PRUNED_TENSORS.get(wrapper.layer.name, ["kernel"])
        assert [w.name for w, _, _ in wrapper.pruning_vars] == [
            getattr(wrapper.layer, a).name for a in attributes]
        assert wrapper.name == f"prune_low_std_{wrapper.layer.name}"
    np.testing.assert_array_equal(pruned(x, training=False).numpy(), outputs)
    assert len(pruned.trainable_weights) == len(model.trainable_weights)


def test_layer_and_list():
    dense, relu, bn = L.Dense(2, name="d"), L.ReLU(), L.BatchNormalization()
    wrapped = tf_stdprune.prune_low_std(dense, std_mode="all", name="custom")
    assert isinstance(wrapped, tf_stdprune.PruneLowStd) and wrapped.layer is dense
    assert wrapped.std_mode == "all" and wrapped.name == "custom"
    result = tf_stdprune.prune_low_std([L.Dense(2, name="d2"), relu, bn],
                                       layer_quality={"d2": 1.5})
    assert isinstance(result[0], tf_stdprune.PruneLowStd) and result[0].layer_quality == 1.5
    assert result[1] is relu and isinstance(result[2], tf_stdprune.PruneLowStd)
    assert tf_stdprune.prune_low_std([bn], prune_batchnorm=False) == [bn]
    assert tf_stdprune.prune_low_std([wrapped], std_mode="all")[0] is wrapped  # same settings: kept
    with pytest.raises(ValueError, match=r"already pruned with other settings.*std_mode.*strip_pruning"):
        tf_stdprune.prune_low_std([wrapped], std_mode="initial")


def test_layer_quality_sets_multiplier_and_rejects_unknown_names():
    pruned = tf_stdprune.prune_low_std(residual(), layer_quality={"c1": 2.0, "d": 0.5})
    factors = {w.layer.name: w.layer_quality for w in _wrappers(pruned)}
    assert factors == {"stem": 1.0, "c1": 2.0, "bn": 1.0, "c2": 1.0, "d": 0.5}
    with pytest.raises(ValueError, match=r"layer_quality.*\['nope'\].*model.summary"):
        tf_stdprune.prune_low_std(residual(), layer_quality={"c1": 2.0, "nope": 1.0})
    with pytest.raises(ValueError, match="layer_quality"):
        tf_stdprune.prune_low_std(residual(), layer_quality={"c1": -1.0})


def test_subclassed_model_raises():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(ValueError, match="^Subclassed models are not supported"):
        tf_stdprune.prune_low_std(Net())


def test_model_without_prunable_layer_returned_unchanged_with_warning(monkeypatch):
    model = keras.Sequential([L.ReLU(input_shape=(4,)), L.Dropout(0.5)])
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    assert tf_stdprune.prune_low_std(model, prune_batchnorm=False) is model
    assert len(warnings) == 1 and model.name in warnings[0] and "no prunable" in warnings[0]
    with_bn = keras.Sequential([L.BatchNormalization(input_shape=(4,))])
    assert tf_stdprune.prune_low_std(with_bn, prune_batchnorm=False) is with_bn
    assert len(warnings) == 2


def test_bad_objects():
    with pytest.raises(TypeError, match="takes a Keras layer or model"):
        tf_stdprune.prune_low_std("model")
    with pytest.raises(ValueError, match="no prunable"):
        tf_stdprune.prune_low_std(L.ReLU())


def _train(model, data, epochs=1):
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    model.fit(*data, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])


def test_shared_layer_trains_with_exact_zeros(tiny_data):
    """A layer called twice per batch advances its pruning step twice per batch."""
    pruned = tf_stdprune.prune_low_std(
        shared(), pruning_schedule=tf_stdprune.StdPruningSchedule([0.5, 0.8, 1.0, 1.2], 4))
    _train(pruned, tiny_data)
    steps = {w.layer.name: int(w.pruning_step.numpy()) for w in _wrappers(pruned)}
    assert steps == {"stem": 8, "shared_c": 16, "d": 8}
    for wrapper in _wrappers(pruned):
        weight, mask, _ = wrapper.pruning_vars[0]
        pruned_entries = mask.numpy() == 0
        assert pruned_entries.any()
        assert np.all(weight.numpy()[pruned_entries] == 0.0), wrapper.name
        for slot in optimizer_slots(pruned.optimizer, weight):
            assert np.all(slot.numpy()[pruned_entries] == 0.0), slot.name


def test_mixed_with_prune_low_magnitude_trains_strips_saves(tiny_data, tmp_path):
    inputs = keras.Input((8, 8, 3))
    magnitude = tfmot.sparsity.keras.prune_low_magnitude(
        L.Conv2D(4, 3, name="mag_c"), tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=2))
    x = tf_stdprune.prune_low_std(L.Conv2D(4, 3, name="std_c"),
                                  tf_stdprune.StdPruningSchedule([1.0], 2))(magnitude(inputs))
    model = keras.Model(inputs, tf_stdprune.prune_low_std(L.Dense(3, name="d"))(L.Flatten()(x)))
    _train(model, tiny_data)
    mag_kernel = model.get_layer("prune_low_magnitude_mag_c").layer.kernel.numpy()
    assert (mag_kernel == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert 0 < (model.get_layer("prune_low_std_std_c").layer.kernel.numpy() == 0).mean() < 1

    x = tiny_data[0][:16]
    expected = model(x, training=False).numpy()
    stripped = tf_stdprune.strip_pruning(model)
    assert [type(l).__name__ for l in stripped.layers] == [
        "InputLayer", "Conv2D", "Conv2D", "Flatten", "Dense"]
    np.testing.assert_allclose(stripped(x, training=False).numpy(), expected, atol=1e-6)
    for candidate, name in ((model, "wrapped.h5"), (stripped, "stripped.h5")):
        candidate.save(tmp_path / name)
        with tf_stdprune.prune_scope():
            reloaded = keras.models.load_model(tmp_path / name)
        assert [type(l) for l in reloaded.layers] == [type(l) for l in candidate.layers]
        np.testing.assert_allclose(reloaded(x, training=False).numpy(), expected, atol=1e-6)
        for a, b in zip(reloaded.get_weights(), candidate.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_prune_train_strip_round_trip(tiny_data):
    pruned = tf_stdprune.prune_low_std(
        conv_kinds(), pruning_schedule=tf_stdprune.StdPruningSchedule([0.6, 1.0], 4))
    _train(pruned, tiny_data)
    x = tiny_data[0][:16]
    expected = pruned(x, training=False).numpy()
    stripped = tf_stdprune.strip_pruning(pruned)
    assert not _wrappers(stripped)
    np.testing.assert_allclose(stripped(x, training=False).numpy(), expected, atol=1e-6)
    zeros = sum(int((m.numpy() == 0).sum())
                for w in _wrappers(pruned) for _, m, _ in w.pruning_vars)
    assert zeros > 0
    assert tf_stdprune.sparsity_report(stripped).zero_weights == zeros
