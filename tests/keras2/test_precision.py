"""Mixed precision and XLA: masks and thresholds stay float32, pruned weights exactly 0."""
import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.prune import all_layers
from tf_stdprune.keras2.wrapper import optimizer_slots

from conftest import tiny_cnn


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _train(model, data, jit_compile, steps_per_iteration=4):
    pruned = tf_stdprune.prune_low_std(
        model, pruning_schedule=tf_stdprune.StdPruningSchedule([0.7, 1.0], steps_per_iteration))
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   jit_compile=jit_compile)
    x, y = data
    pruned.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    return pruned


def _check_pruned_exactly(model):
    wrappers = [l for l in all_layers(model) if isinstance(l, tf_stdprune.PruneLowStd)]
    kernels = 0
    for layer in wrappers:
        for weight, mask, threshold in layer.pruning_vars:
            assert mask.dtype == tf.float32 and threshold.dtype == tf.float32
            stored = np.asarray(getattr(weight, "_variable", weight).numpy())
            assert stored.dtype == np.float32
            pruned = mask.numpy() == 0
            assert np.all(stored[pruned] == 0.0)
            slots = optimizer_slots(model.optimizer, weight)
            assert len(slots) == 1  # SGD's momentum, found through any LossScaleOptimizer
            for slot in slots:
                assert np.all(slot.numpy()[pruned] == 0.0), slot.name
            kernels += pruned.any()
    assert kernels >= 2  # conv and dense kernels were pruned


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"], indirect=True)
def test_mixed_precision_keeps_float32_masks_and_exact_zeros(policy, tiny_data):
    model = _train(tiny_cnn(), tiny_data, jit_compile=False)
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    _check_pruned_exactly(model)


def test_xla_compiled_train_step_matches_eager_masks(tiny_data):
    weights = tiny_cnn().get_weights()
    models = []
    for jit in (False, True):
        model = tiny_cnn()
        model.set_weights(weights)
        models.append(_train(model, tiny_data, jit_compile=jit))
    _check_pruned_exactly(models[1])
    eager, compiled = ([l for l in m.layers if isinstance(l, tf_stdprune.PruneLowStd)] for m in models)
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a.pruning_vars[0][1].numpy(), b.pruning_vars[0][1].numpy())
        np.testing.assert_allclose(a.pruning_vars[0][0].numpy(), b.pruning_vars[0][0].numpy(),
                                   atol=1e-4)
