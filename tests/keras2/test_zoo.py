"""Model zoo: every supported layer kind and topology prunes, trains, strips, saves, reloads."""
import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.prune import all_layers

L = keras.layers


def sequential_cnn():
    return keras.Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 3), use_bias=False),
                             L.BatchNormalization(), L.ReLU(), L.Flatten(), L.Dense(3)])


def small_resnet():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    for _ in range(2):
        y = L.Conv2D(4, 3, padding="same", use_bias=False)(x)
        y = L.BatchNormalization()(y)
        y = L.ReLU()(y)
        y = L.Conv2D(4, 3, padding="same")(y)
        x = L.Add()([x, y])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3)(x))


def nested():
    inner = keras.Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 3)), L.ReLU(), L.Flatten()])
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, L.Dense(3)(inner(inputs)))


def shared_branches():
    inputs = keras.Input((8, 8, 3))
    shared = L.Conv2D(4, 3, padding="same")
    a = shared(inputs)
    b = shared(L.Lambda(lambda t: t[:, ::-1])(inputs))
    x = L.Flatten()(L.Concatenate()([a, b]))
    return keras.Model(inputs, L.Dense(3)(x))


def conv_kinds_2d():
    return keras.Sequential([
        L.DepthwiseConv2D(3, input_shape=(8, 8, 3)), L.SeparableConv2D(4, 3),
        L.Conv2DTranspose(4, 3), L.Flatten(), L.Dense(3, use_bias=False)])


def conv1d():
    return keras.Sequential([L.Reshape((64, 3), input_shape=(8, 8, 3)), L.Conv1D(4, 3),
                             L.SeparableConv1D(4, 3), L.Flatten(), L.Dense(3)])


def conv3d():
    return keras.Sequential([L.Reshape((4, 4, 4, 3), input_shape=(8, 8, 3)),
                             L.Conv3D(4, 2), L.Flatten(), L.Dense(3)])


ZOO = {f.__name__: f for f in (sequential_cnn, small_resnet, nested, shared_branches,
                                conv_kinds_2d, conv1d, conv3d)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_prune_train_strip_save_reload(name, tmp_path, tiny_data):
    x, y = tiny_data
    pruned = tf_stdprune.prune_low_std(
        ZOO[name](), pruning_schedule=tf_stdprune.StdPruningSchedule([0.8], steps_per_iteration=100))
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy().copy() for l in all_layers(pruned)
              if isinstance(l, tf_stdprune.PruneLowStd) for w, _, _ in l.pruning_vars]
    pruned.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    wrappers = [l for l in all_layers(pruned) if isinstance(l, tf_stdprune.PruneLowStd)]
    assert wrappers
    after = [(w.numpy(), m.numpy()) for l in wrappers for w, m, _ in l.pruning_vars]
    for (weight, mask), initial in zip(after, before):
        if initial.std() > 0:  # BN gammas start constant: sigma = 0 prunes nothing
            assert 0 < (mask == 0).mean() < 1
        else:
            assert np.all(mask == 1)
        assert np.all(weight[mask == 0] == 0.0)
        assert np.any(weight[mask == 1] != initial[mask == 1])  # survivors trained

    stripped = tf_stdprune.strip_pruning(pruned)
    assert not any(isinstance(l, tf_stdprune.PruneLowStd) for l in all_layers(stripped))
    expected = pruned.predict(x, verbose=0)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), expected, atol=1e-5)
    path = str(tmp_path / "stripped.keras")
    stripped.save(path)
    reloaded = keras.models.load_model(path, safe_mode=False)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-5)
    assert tf_stdprune.sparsity_report(reloaded).zero_weights == sum(
        int((m == 0).sum()) for _, m in after)
