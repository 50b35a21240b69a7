"""Save a pruned model mid-training, reload it under prune_scope(), continue identically.

Formats: ``.h5``, ``.keras`` and the SavedModel directory. ``.h5`` and ``.keras``
restore the optimizer (iterations and momentum slots), so the reloaded model continues
with the restored optimizer and must match the original continuing with its own.
tf_keras does not restore optimizer state from a SavedModel (``iterations`` comes back 0,
the slots are rebuilt as zeros, also for unpruned models), so that copy and an exact
in-memory copy of the model at saving time are both compiled with a fresh optimizer.
"""
import numpy as np

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.wrapper import PruneLowStd

from conftest import tiny_cnn


def _state(model):
    """Masks, thresholds, sigmas and steps of every wrapper, as numpy."""
    state = {}
    for layer in model.layers:
        if isinstance(layer, PruneLowStd):
            for i, (_, mask, threshold) in enumerate(layer.pruning_vars):
                state[layer.name, i] = (mask.numpy(), threshold.numpy(), layer.sigmas[i].numpy())
            state[layer.name] = (int(layer.pruning_step.numpy()),
                                 int(layer.pruned_at_step.numpy()), layer.get_config())
    return state


def _fit(model, data):
    model.fit(*data, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])


FORMATS = ["model.h5", "model.keras", "saved_model"]
WITH_OPTIMIZER_STATE = {"model.h5", "model.keras"}


def _sgd():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def test_reload_keeps_pruning_state_and_training_continues_identically(tmp_path, tiny_data):
    model = tf_stdprune.prune_low_std(
        tiny_cnn(l2=1e-3), std_mode="surviving", layer_quality={"dense": 1.5},
        pruning_schedule=tf_stdprune.StdPruningSchedule([0.6, 0.9, 1.2], 4))
    model.compile(_sgd(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, tiny_data)  # prunes at calls 1 and 5 of 8 (tfmot's step numbers)
    saved = _state(model)
    assert saved["prune_low_std_dense"][:2] == (8, 5)
    reloaded = {}
    for name in FORMATS:
        model.save(tmp_path / name)
        with tf_stdprune.prune_scope():
            reloaded[name] = keras.models.load_model(tmp_path / name)
    for name, copy in reloaded.items():
        assert [type(l) for l in copy.layers] == [type(l) for l in model.layers], name
        _assert_same_state(_state(copy), saved, name)
        for a, b in zip(copy.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=name)
        assert type(copy.optimizer) is type(model.optimizer), name
    fresh = keras.models.clone_model(model)  # the model at saving time, fresh optimizer
    fresh.set_weights(model.get_weights())
    for copy in (fresh, reloaded["saved_model"]):
        copy.compile(_sgd(), model.loss)
        _fit(copy, tiny_data)
    _fit(model, tiny_data)  # prunes again at calls 9 and 13
    assert _state(model)["prune_low_std_dense"][:2] == (16, 13)

    for name, copy in reloaded.items():
        reference = model if name in WITH_OPTIMIZER_STATE else fresh
        if name in WITH_OPTIMIZER_STATE:
            _fit(copy, tiny_data)
        _assert_same_state(_state(copy), _state(reference), name)
        for a, b in zip(copy.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=name)
        for a, b in zip(copy.optimizer.variables, reference.optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{name} {a.name}")
    assert not np.array_equal(fresh.get_weights()[0], model.get_weights()[0])  # state mattered


def _assert_same_state(state, expected, name):
    assert state.keys() == expected.keys(), name
    for key, values in state.items():
        for a, b in zip(values, expected[key]):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {key}")
            else:
                assert a == b, (name, key)


def test_wrapper_config_round_trip():
    layer = tf_stdprune.PruneLowStd(
        keras.layers.Conv2D(3, 2, name="c"), tf_stdprune.StdPruningSchedule([0.5, 1.0], 7, 3, 40),
        std_mode="all", layer_quality=1.25, prune_batchnorm=False, name="w")
    config = layer.get_config()
    with tf_stdprune.prune_scope():
        copy = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(copy) is PruneLowStd and copy.get_config() == config
    assert (copy.std_mode, copy.layer_quality, copy.prune_batchnorm) == ("all", 1.25, False)
    assert copy.pruning_schedule.get_config() == layer.pruning_schedule.get_config()
    assert PruneLowStd.from_config(config).get_config() == config


def test_a_config_saved_with_the_former_name_quality_multiplier_loads_as_layer_quality():
    layer = tf_stdprune.PruneLowStd(keras.layers.Dense(3, name="d"), layer_quality=0.75)
    config = layer.get_config()
    config["quality_multiplier"] = config.pop("layer_quality")
    copy = PruneLowStd.from_config(config)
    assert copy.layer_quality == 0.75 and copy.get_config() == layer.get_config()
