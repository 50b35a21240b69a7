"""Runs a few pruned train steps under a tf.distribute strategy and saves the masks.

Run as a subprocess by tests/keras2/test_distribute.py (logical devices and TF_CONFIG must be set
before TensorFlow starts):  python distributed_worker.py STRATEGY OUT.npz
STRATEGY is ``mirrored`` (2 logical CPUs), ``multi_worker`` (TF_CONFIG set by the caller)
or ``single``. Every run starts from the same weights, so their step-0 masks must agree.
"""
import sys

import numpy as np
import tensorflow as tf

strategy_name, out_path = sys.argv[1], sys.argv[2]
if strategy_name == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import tf_stdprune  # noqa: E402
from tf_stdprune.keras2.engine import keras  # noqa: E402
from tf_stdprune.keras2.prune import all_layers  # noqa: E402

STRATEGIES = {
    "mirrored": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    "multi_worker": tf.distribute.MultiWorkerMirroredStrategy,
    "single": tf.distribute.get_strategy,
}


def main():
    strategy = STRATEGIES[strategy_name]()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=32)
    with strategy.scope():
        model = keras.Sequential([
            keras.layers.Conv2D(8, 3, padding="same", input_shape=(8, 8, 3)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ])
        model = tf_stdprune.prune_low_std(
            model, pruning_schedule=tf_stdprune.StdPruningSchedule([0.5, 0.8], steps_per_iteration=2),
            std_mode="initial")
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Two passes over 4 batches of 8: pruning at steps 0, 2, 4, 6.
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    arrays = {}
    for layer in all_layers(model):
        if isinstance(layer, tf_stdprune.PruneLowStd):
            for (weight, mask, threshold), sigma in zip(layer.pruning_vars, layer.sigmas):
                name = weight.name.split(":")[0]
                for kind, var in (("mask", mask), ("threshold", threshold), ("sigma", sigma),
                                  ("weight", weight)):
                    replicas = getattr(var, "values", (var,))
                    arrays[f"{name}/{kind}"] = np.stack([np.asarray(v) for v in replicas])
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main()
