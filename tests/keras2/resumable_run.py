"""A small, deterministic iterative run that can be killed with SIGKILL on purpose.

Dropout and data augmentation are on, and the data are reshuffled every epoch; all their
randomness comes from `tf.random.Generator` objects (Keras's layer generators, switched
on by ``enable_tf_random_generator``, and one for the data), which every iteration's
checkpoint saves, so a resumed run repeats an uninterrupted one bit for bit. At the end
it writes ``weights.sha256``, the digest of every weight of the model.

    python resumable_run.py RUN_DIR [--kill_after_batches=N | --kill_on_replace=N]

``--kill_after_batches=N`` kills the process after its N-th training batch;
``--kill_on_replace=N`` kills it at its N-th ``os.replace`` call, i.e. in the middle of
writing a checkpoint, history or state file (a file is replaced by that one rename).
Rerunning the same command resumes.
"""
import argparse
import hashlib
import itertools
import os
import signal

import numpy as np
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2 import run_state
from tf_stdprune.keras2.engine import keras

ITERATIONS, EPOCHS, BATCH = 4, 2, 16


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill_after_batches", type=int)
    parser.add_argument("--kill_on_replace", type=int)
    args = parser.parse_args()
    if args.kill_on_replace:
        replace, calls = os.replace, [0]

        def dying_replace(src, dst):
            calls[0] += 1
            if calls[0] == args.kill_on_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)

        run_state.os.replace = dying_replace

    keras.utils.set_random_seed(0)
    keras.backend.experimental.enable_tf_random_generator()
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 0).astype("int64") + (x[..., 1].mean(axis=(1, 2)) > 0)
    model = keras.Sequential([
        keras.layers.Conv2D(6, 3, padding="same", input_shape=(8, 8, 3)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dropout(0.3), keras.layers.Dense(3)])
    steps = len(x) // BATCH
    data_rng = tf.random.Generator.from_seed(1)
    train = shuffled_and_augmented(x, y, data_rng)
    model = tf_stdprune.prune_low_std(model, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.4, 0.7, 1.0, 1.3], steps_per_iteration=EPOCHS * steps))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
    extras = {"data_rng": data_rng}
    callbacks = tf_stdprune.iterative_callbacks(
        args.run_dir, EPOCHS, [0.05, 0.02], lr_drops=(1,),
        validation_data=tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16),
        recalibration_data=train, recalibration_batches=2, figures=False,
        checkpoint_extras=extras)
    if args.kill_after_batches:
        counter = itertools.count(1)
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            os.kill(os.getpid(), signal.SIGKILL)
            if next(counter) == args.kill_after_batches else None)))
    initial_epoch = tf_stdprune.restore_run(model, args.run_dir, extras=extras)
    model.fit(train, epochs=ITERATIONS * EPOCHS, initial_epoch=initial_epoch, verbose=0,
              callbacks=callbacks)
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.numpy().tobytes())
    with open(os.path.join(args.run_dir, "weights.sha256"), "w") as f:
        f.write(digest.hexdigest())


def shuffled_and_augmented(x, y, generator):
    """Batches of ``(x, y)`` in a new order every epoch, each image rolled by 0-2 pixels
    and given Gaussian noise; every random number is drawn from ``generator``."""
    def shuffled(_):
        order = tf.argsort(generator.uniform([len(x)]))
        return tf.data.Dataset.from_tensor_slices((tf.gather(x, order), tf.gather(y, order)))

    def augment(images, labels):
        shift = generator.uniform([], 0, 3, dtype=tf.int32)
        noise = generator.normal(tf.shape(images), stddev=0.1)
        return tf.roll(images, shift, axis=2) + noise, labels

    return (tf.data.Dataset.from_tensors(0).flat_map(shuffled).batch(BATCH).map(augment)
            .apply(tf.data.experimental.assert_cardinality(len(x) // BATCH)))

if __name__ == "__main__":
    main()
